"""Every method x backbone x shot on small CPU inputs: output shapes, a backward pass, and exactly which
parameters receive gradients with a frozen backbone and with SVF; BatchNorm statistics never move."""

from __future__ import annotations

import copy

import pytest
import torch
from svf_fss.models import BAM, build_backbone, build_model
from svf_fss.models.strategies import apply_strategy
from torch import nn

import svftune

BACKBONES = ("resnet50_v2", "resnet50", "vgg16_bn", "mobilenet_v2")
METHODS = ("baseline", "pfenet", "bam")
BINS = (1.0, 0.5, 0.25, 0.125)  # relative FEM bins: PFENet's absolute 60x60 bins would dominate a tiny test
SVF_STAGES = ("layer2", "layer3", "layer4")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain():
    """Random-weight backbones, one per name, built once (tests use deep copies)."""
    cache: dict[str, nn.Module] = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_backbone(name)
            randomize_bn_statistics(cache[name])
        return copy.deepcopy(cache[name])

    return get


@pytest.fixture(scope="module")
def svf(plain):
    """The same backbones with SVF on layers 2-4 (decomposed once: ~2 s for a ResNet-50)."""
    cache: dict[str, nn.Module] = {}

    def get(name):
        if name not in cache:
            backbone = plain(name)
            apply_strategy(backbone, "svf")
            cache[name] = backbone
        return copy.deepcopy(cache[name])

    return get


def randomize_bn_statistics(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def episode(shots, batch=None, size=(57, 65), seed=0):
    """Query, supports, support masks, query mask, base labels and episode classes for ``batch`` episodes."""
    batch = batch or (2 if shots == 1 else 1)
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    query = torch.randn(batch, 3, height, width, generator=generator)
    supports = torch.randn(batch, shots, 3, height, width, generator=generator)
    support_masks = torch.zeros(batch, shots, height, width, dtype=torch.long)
    support_masks[..., 10:40, 12:50] = 1
    support_masks[..., 0:3, :] = 255
    query_mask = (torch.rand(batch, height, width, generator=generator) > 0.6).long()
    query_mask[:, -2:, :] = 255
    base_label = torch.randint(0, 16, (batch, height, width), generator=generator)
    episode_class = torch.randint(1, 16, (batch,), generator=generator)
    return query, supports, support_masks, query_mask, base_label, episode_class


def run_training_step(model, shots):
    query, supports, support_masks, query_mask, base_label, episode_class = episode(shots)
    model.train()
    out = model(query, supports, support_masks, query_mask, base_label=base_label, episode_class=episode_class)
    assert out["logits"].shape == (query.shape[0], 2, *query.shape[-2:])
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    expected_terms = {"baseline": {"main"}, "pfenet": {"main", "aux0", "aux1", "aux2", "aux3"}}
    assert set(out["losses"]) == expected_terms.get(model.method, {"main", "meta", "base"})
    out["loss"].backward()
    model.eval()
    with torch.no_grad():
        logits = model(query, supports, support_masks)
    assert logits.shape == (query.shape[0], 2, *query.shape[-2:]) and torch.isfinite(logits).all()
    return out


def bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def assert_heads_have_gradients(model):
    heads = model.head_parameters()
    assert heads, "a method without trainable head parameters"
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    missing = [n for n in missing if not n.startswith("backbone.")]
    assert not missing, f"head parameters without a gradient: {missing}"
    assert all(id(p) in {id(q) for q in heads} for n, p in model.named_parameters() if n.startswith("down_query"))


def assert_base_learner_untouched(model):
    if isinstance(model, BAM):
        for module in model.frozen_modules():
            assert all(p.grad is None and not p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_frozen_backbone(method, name, shots, plain):
    """Shapes and backward; the frozen backbone gets no gradient and its BN statistics never move."""
    torch.manual_seed(0)
    model = build_model(method, plain(name), shots, "frozen", pyramid_bins=BINS)
    before = bn_state(model)
    run_training_step(model, shots)
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    after = bn_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert_heads_have_gradients(model)
    assert_base_learner_untouched(model)
    groups = {g["name"] for g in model.param_groups()}
    assert groups == {"head"}


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_svf_backbone(method, name, shots, plain, svf):
    """With SVF only the singular values of layers 2-4 and the head parameters receive gradients."""
    torch.manual_seed(0)
    base = plain(name) if method == "bam" else None
    model = build_model(method, svf(name), shots, None, pyramid_bins=BINS, base_backbone=base)
    before = bn_state(model)
    run_training_step(model, shots)
    expected = {f"{layer}.S" for layer, _ in svftune.svf_layers(model.backbone)}
    assert expected and all(n.split(".")[0] in SVF_STAGES for n in expected)
    with_grad = {n for n, p in model.backbone.named_parameters() if p.grad is not None}
    assert with_grad == expected
    assert all(model.backbone.get_parameter(n).grad.abs().sum() > 0 for n in expected if n.startswith("layer4"))
    after = bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_heads_have_gradients(model)
    assert_base_learner_untouched(model)
    groups = {g["name"]: g for g in model.param_groups()}
    assert set(groups) == {"head", "singular_values"} and groups["singular_values"]["lr_scale"] == 0.1
    assert {id(p) for p in groups["singular_values"]["params"]} == {
        id(model.backbone.get_parameter(n)) for n in expected
    }


@pytest.mark.parametrize("method", METHODS)
def test_svf_model_equals_frozen_model_before_training(method, plain, svf):
    """At S == S0 the SVF model is the pretrained model, bit for bit, in eval."""
    frozen = build_model(method, plain("resnet50_v2"), 1, "frozen", pyramid_bins=BINS)
    tuned = build_model(method, svf("resnet50_v2"), 1, None, pyramid_bins=BINS, base_backbone=plain("resnet50_v2"))
    heads = {k: v for k, v in frozen.state_dict().items() if not k.startswith(("backbone.", "base_backbone."))}
    missing, unexpected = tuned.load_state_dict(heads, strict=False)
    assert not unexpected and all(k.startswith(("backbone.", "base_backbone.")) for k in missing)
    query, supports, support_masks, *_ = episode(1)
    with torch.no_grad():
        assert torch.equal(frozen.eval()(query, supports, support_masks), tuned.eval()(query, supports, support_masks))


@pytest.mark.parametrize("method", ["baseline", "pfenet"])
def test_k_identical_shots_equal_one_shot(method, plain):
    """K-shot averages prototypes and priors (the released SVF baseline sums them): K copies of one support
    give the 1-shot prediction."""
    model = build_model(method, plain("mobilenet_v2"), 5, "frozen", pyramid_bins=BINS).eval()
    query, supports, support_masks, *_ = episode(1, batch=2)
    with torch.no_grad():
        one = model(query, supports, support_masks)
        five = model(query, supports.expand(-1, 5, -1, -1, -1), support_masks.expand(-1, 5, -1, -1))
    torch.testing.assert_close(five, one, rtol=1e-5, atol=1e-5)


def test_baseline_kshot_sum_is_k_times_the_mean(plain):
    """kshot="sum" (the SVF release's rule) hands the meta learner K x the averaged prototype and prior; at 1 shot
    the two rules are the same model. References: the per-shot features summed in float64."""
    torch.manual_seed(0)
    mean = build_model("baseline", plain("mobilenet_v2"), 5, "frozen").eval()
    summed = build_model("baseline", plain("mobilenet_v2"), 5, "frozen", kshot="sum").eval()
    summed.load_state_dict(mean.state_dict())
    assert (mean.kshot, summed.kshot) == ("mean", "sum")
    query, supports, support_masks, *_ = episode(5, batch=2, seed=3)
    seen = {}

    def keep(name):
        def hook(module, args):
            seen[name] = [a.detach().clone() for a in args]

        return hook

    with torch.no_grad():
        features = mean.encode(query, supports, support_masks)
        mean.meta.register_forward_pre_hook(keep("mean"))
        summed.meta.register_forward_pre_hook(keep("sum"))
        mean(query, supports, support_masks)
        summed(query, supports, support_masks)
    (q_mean, proto_mean, prior_mean), (q_sum, proto_sum, prior_sum) = seen["mean"], seen["sum"]
    torch.testing.assert_close(q_sum, q_mean, rtol=0, atol=0)
    torch.testing.assert_close(proto_sum, 5 * proto_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(prior_sum, 5 * prior_mean, rtol=1e-6, atol=1e-6)
    reference = features.prototypes.double().sum(dim=1)
    torch.testing.assert_close(proto_sum.double(), reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(prior_sum.double(), features.priors.double().sum(dim=1), rtol=1e-6, atol=1e-7)
    assert prior_sum.max() > 1.5  # five priors in [0, 1] added, not averaged

    one_mean = build_model("baseline", plain("mobilenet_v2"), 1, "frozen").eval()
    one_sum = build_model("baseline", plain("mobilenet_v2"), 1, "frozen", kshot="sum").eval()
    one_sum.load_state_dict(one_mean.state_dict())
    query, supports, support_masks, *_ = episode(1, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(one_sum(query, supports, support_masks), one_mean(query, supports, support_masks))


def test_kshot_rule_is_the_baseline_s_option(plain):
    with pytest.raises(ValueError, match="unknown K-shot rule 'max'"):
        build_model("baseline", plain("mobilenet_v2"), 5, "frozen", kshot="max")
    for method in ("pfenet", "bam"):
        with pytest.raises(ValueError, match="the baseline's option"):
            build_model(method, plain("mobilenet_v2"), 5, "frozen", kshot="sum")


def test_bam_k_identical_shots_equal_one_shot(plain):
    """BAM's K-shot weights are a softmax: identical shots reproduce the 1-shot model (sharing all weights)."""
    torch.manual_seed(0)
    one = build_model("bam", plain("mobilenet_v2"), 1, "frozen").eval()
    five = build_model("bam", plain("mobilenet_v2"), 5, "frozen").eval()
    missing, unexpected = five.load_state_dict(one.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("kshot_rw") for k in missing)
    query, supports, support_masks, *_ = episode(1, batch=2)
    with torch.no_grad():
        expected = one(query, supports, support_masks)
        got = five(query, supports.expand(-1, 5, -1, -1, -1), support_masks.expand(-1, 5, -1, -1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="built for 5 shot"):
        five(query, supports, support_masks)


def test_bam_base_learner_keeps_the_undecomposed_backbone(plain, svf):
    """Under SVF the base learner sees the original backbone's features even after S moved; the meta learner
    sees the tuned ones. Unchanged leading stages are shared, not recomputed differently."""
    reference = plain("mobilenet_v2").eval()
    model = build_model("bam", "mobilenet_v2", 1, "frozen")  # the build path, not the fixtures
    assert model.base_backbone is None
    model = BAM(plain("mobilenet_v2"), 1)
    model.set_strategy("svf")
    assert model.base_backbone is not None and not svftune.svf_layers(model.base_backbone)
    assert model.backbone.changed_stages() == [2, 3, 4]
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model.backbone):
            layer.S.mul_(1.1)
    model.eval()
    query = episode(1)[0]
    with torch.no_grad():
        expected = reference(query)[4]
        stages = model.backbone(query)
        assert not torch.allclose(stages[4], expected)
        torch.testing.assert_close(model._base_features(query, stages), expected, rtol=1e-5, atol=1e-5)


def test_bam_excludes_the_episode_class_in_training_only(plain):
    model = build_model("bam", plain("mobilenet_v2"), 1, "frozen")
    with torch.no_grad():
        model.cls_merge.weight.copy_(torch.tensor([1.0, 1.0]).reshape(1, 2, 1, 1))  # make the base map count
    query, supports, support_masks, query_mask, _, _ = episode(1)
    outputs = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        for cls in (1, 2):
            torch.manual_seed(0)  # same dropout masks
            with torch.no_grad():
                out = model(query, supports, support_masks, query_mask, episode_class=torch.tensor([cls, cls]))
            outputs[mode, cls] = out["logits"]
    assert not torch.equal(outputs["train", 1], outputs["train", 2])
    assert torch.equal(outputs["eval", 1], outputs["eval", 2])


def test_non_square_and_different_support_size(plain):
    """No square-input assumption (the public code reshapes with one side); supports may differ in size."""
    model = build_model("pfenet", plain("mobilenet_v2"), 1, "frozen", pyramid_bins=BINS).eval()
    query = torch.randn(1, 3, 49, 81)
    supports = torch.randn(1, 1, 3, 65, 57)
    masks = torch.ones(1, 1, 65, 57)
    with torch.no_grad():
        assert model(query, supports, masks).shape == (1, 2, 49, 81)


def test_pfenet_default_absolute_bins(plain):
    model = build_model("pfenet", plain("mobilenet_v2"), 1, "frozen")
    assert model.fem.bins == (60, 30, 15, 8)
    query, supports, support_masks, query_mask, *_ = episode(1, batch=1, size=(33, 33))
    model.train()
    model(query, supports, support_masks, query_mask)["loss"].backward()
    assert build_model("pfenet", plain("mobilenet_v2"), 1, dataset="coco").fem.bins == BINS
