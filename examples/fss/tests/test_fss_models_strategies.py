"""Backbone fine-tuning strategies: for every strategy the trainable backbone parameters are exactly the expected
set, exactly those receive gradients, BatchNorm statistics stay frozen, and the optimizer groups are right."""

from __future__ import annotations

import copy

import pytest
import torch
from svf_fss.models import STRATEGIES, Baseline, apply_strategy, build_backbone, build_model, parse_strategy
from svf_fss.models.strategies import LORA_RANK, Strategy
from torch import nn

import svftune

FACTORS = {"svf": "S", "svf+bn": "S", "svf-u": "U", "svf-v": "V", "svf-us": "US", "svf-sv": "SV", "svf-usv": "USV"}
FACTOR_NAMES = {"U": "U", "S": "S", "V": "Vh"}
DEFAULT_STAGES = ("layer2", "layer3", "layer4")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_backbone(name)
        return copy.deepcopy(cache[name])

    return get


def expected_trainable(backbone: nn.Module, spec: Strategy) -> set[str]:
    """Computed from the plain backbone's structure, independently of the implementation."""
    stages = set(spec.layers)

    def inside(name):
        return name.split(".")[0] in stages

    convs = {n: m for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d) and inside(n)}
    norms = {n: m for n, m in backbone.named_modules() if isinstance(m, nn.BatchNorm2d) and inside(n)}
    norm_params = {f"{n}.{p}" for n in norms for p in ("weight", "bias")}
    if spec.name == "frozen":
        return set()
    if spec.name in FACTORS:
        names = {f"{n}.{FACTOR_NAMES[f]}" for n in convs for f in FACTORS[spec.name]}
        return names | (norm_params if spec.name == "svf+bn" else set())
    if spec.name == "full":
        return {n for n, _ in backbone.named_parameters() if inside(n)}
    if spec.name == "partial":
        size = {"3x3": (3, 3), "1x1": (1, 1), None: None}[spec.conv_kind]
        chosen = [n for n, m in convs.items() if size is None or m.kernel_size == size]
        return {f"{n}.weight" for n in chosen} | {f"{n}.bias" for n in chosen if convs[n].bias is not None}
    if spec.name == "bn":
        return norm_params
    if spec.name == "bias":
        return {n for n, _ in backbone.named_parameters() if inside(n) and n.endswith(".bias")}
    if spec.name == "adapter":
        return {f"adapters.{s}.{p}.{t}" for s in spec.layers for p in ("down", "up") for t in ("weight", "bias")}
    if spec.name == "lora":  # PEFT's naming: base conv kept as .base_layer, factors per adapter name "default"
        return {f"{n}.lora_{f}.default.weight" for n, m in convs.items() if m.groups == 1 for f in ("A", "B")}
    raise AssertionError(spec)


CASES = [("mobilenet_v2", s) for s in STRATEGIES] + [
    ("mobilenet_v2", "svf:layer4"),
    ("mobilenet_v2", "svf:1-4"),
    ("mobilenet_v2", "partial:3x3"),
    ("mobilenet_v2", "partial:layer3-4,1x1"),
    ("mobilenet_v2", "full:layer4"),
    ("mobilenet_v2", "lora:layer4,r=2"),
    ("resnet50_v2", "svf:layer4"),
    ("resnet50_v2", "partial:3x3"),
    ("resnet50_v2", "partial:1x1"),
    ("resnet50_v2", "bn"),
    ("resnet50_v2", "bias"),
    ("resnet50_v2", "full"),
    ("resnet50_v2", "adapter"),
    ("vgg16_bn", "bias"),
    ("vgg16_bn", "svf-v:layer4"),
]


@pytest.mark.parametrize(("name", "strategy"), CASES)
def test_trainable_set_gradients_and_groups(name, strategy, plain):
    backbone = plain(name)
    spec = parse_strategy(strategy)
    expected = expected_trainable(backbone, spec)
    groups = apply_strategy(backbone, strategy)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert backbone.strategy == spec

    backbone.train()
    assert not any(m.training for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    statistics = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    torch.manual_seed(0)
    features = backbone(torch.randn(2, 3, 41, 41))
    if expected:
        sum(f.square().mean() for f in features).backward()
    with_grad = {n for n, p in backbone.named_parameters() if p.grad is not None}
    assert with_grad == expected
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in statistics.items())

    by_name = {g["name"]: g for g in groups}
    assert sum(len(g["params"]) for g in groups) == len(expected)
    if spec.name == "adapter":
        assert set(by_name) == {"adapters"} and by_name["adapters"]["lr_scale"] == 1.0
    elif "S" in FACTORS.get(spec.name, ""):
        singular = {id(layer.S) for _, layer in svftune.svf_layers(backbone)}
        assert {id(p) for p in by_name["singular_values"]["params"]} == singular
        assert by_name["singular_values"]["lr_scale"] == 0.1
    if spec.name == "lora":
        assert set(by_name) == {"lora"}
    for group in groups:
        assert group["lr_scale"] == (1.0 if group["name"] == "adapters" else 0.1)


@pytest.mark.parametrize(("name", "count"), [("resnet50", 12_544), ("vgg16_bn", 3_840)])
def test_svf_trains_the_papers_number_of_singular_values(name, count, plain):
    backbone = plain(name)
    groups = apply_strategy(backbone, "svf")
    assert [g["name"] for g in groups] == ["singular_values"]
    assert sum(p.numel() for p in groups[0]["params"]) == count


def test_adapters_start_as_identity_and_train(plain):
    reference = plain("mobilenet_v2").eval()
    adapted = plain("mobilenet_v2")
    apply_strategy(adapted, "adapter:layer0-4")
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(reference(x), adapted.eval()(x), strict=True))
    assert sorted(adapted.adapters) == ["layer0", "layer1", "layer2", "layer3", "layer4"]


def test_parse_strategy():
    assert parse_strategy("svf") == Strategy("svf", ("layer2", "layer3", "layer4"))
    assert parse_strategy("SVF:layer3-4") == Strategy("svf", ("layer3", "layer4"))
    assert parse_strategy("svf:4,2") == Strategy("svf", ("layer2", "layer4"))
    assert parse_strategy("partial:layer4,3x3") == Strategy("partial", ("layer4",), "3x3")
    assert parse_strategy("partial", conv_kind="1x1") == Strategy("partial", ("layer2", "layer3", "layer4"), "1x1")
    assert parse_strategy("full").layers == ("layer0", "layer1", "layer2", "layer3", "layer4")
    assert parse_strategy("svf", layers=["layer1", "layer4"]).layers == ("layer1", "layer4")
    assert parse_strategy("frozen") == Strategy("frozen", ())
    assert str(parse_strategy("partial:4,1x1")) == "partial:layer4,1x1"
    assert parse_strategy("lora") == Strategy("lora", ("layer2", "layer3", "layer4"), None, LORA_RANK)
    assert parse_strategy("lora:layer4,r=3") == Strategy("lora", ("layer4",), None, 3)
    assert str(parse_strategy("lora:r=2")) == "lora:layer2,layer3,layer4,r=2"
    for bad, message in [
        ("nope", "unknown strategy"),
        ("svf:3x3", "applies to 'partial' only"),
        ("svf:layer5", "cannot read 'layer5'"),
        ("svf:4-2", "empty stage range"),
        ("svf:r=2", "applies to 'lora' only"),
        ("lora:r=0", "a LoRA rank is r=N"),
        ("lora:r=x", "a LoRA rank is r=N"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_strategy(bad)
    with pytest.raises(ValueError, match="unknown stage"):
        parse_strategy("svf", layers=["layer9"])


def test_strategy_applies_once_and_models_route_to_their_backbone(plain):
    backbone = plain("mobilenet_v2")
    apply_strategy(backbone, "bn")
    with pytest.raises(ValueError, match="already has strategy"):
        apply_strategy(backbone, "svf")
    model = Baseline(plain("mobilenet_v2"))  # apply_strategy on a model routes to model.set_strategy
    groups = apply_strategy(model, "svf:layer4")
    assert model.backbone.strategy == Strategy("svf", ("layer4",)) and groups[0]["name"] == "singular_values"
    bam = build_model("bam", plain("mobilenet_v2"), 1, "bias")
    assert bam.base_backbone is not None and not any(p.requires_grad for p in bam.base_backbone.parameters())
    assert {g["name"] for g in bam.param_groups()} == {"head", "backbone"}


def _lora_count(backbone: nn.Module, stages: tuple[str, ...], rank: int) -> int:
    """r * (C_in k_h k_w) for A plus C_out * r for B, for every ungrouped conv of the stages."""
    return sum(
        rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
        for n, m in backbone.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and n.split(".")[0] in stages
    )


def test_lora_starts_as_the_pretrained_backbone_and_counts_like_svf(plain):
    reference = plain("mobilenet_v2").eval()
    lora, svf = plain("mobilenet_v2"), plain("mobilenet_v2")
    groups = apply_strategy(lora, "lora")
    apply_strategy(svf, "svf")
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():  # B starts at zero: W x + B A x is W x exactly
        assert all(torch.equal(a, b) for a, b in zip(reference(x), lora.eval()(x), strict=True))
    lora_count = sum(p.numel() for g in groups for p in g["params"])
    assert lora_count == _lora_count(reference, DEFAULT_STAGES, LORA_RANK)
    svf_count = sum(layer.S.numel() for _, layer in svftune.svf_layers(svf))
    assert 0.25 <= lora_count / svf_count <= 4, (lora_count, svf_count)  # "the same order" as SVF's
    # grouped (depthwise) convs stay plain: PEFT cannot adapt them at a rank below their group count
    depthwise = [n for n, m in reference.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    adapted = dict(lora.named_modules())
    assert depthwise and all(type(adapted[n]) is nn.Conv2d for n in depthwise if n.split(".")[0] in DEFAULT_STAGES)


def test_lora_one_step_moves_only_lora_factors_and_head(plain):
    torch.manual_seed(0)
    model = build_model("baseline", plain("mobilenet_v2"), 1, "lora:layer3-4")
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    with torch.no_grad():  # B starts at zero, where A gets no gradient: give B values so that both must get one
        for name, p in lora.items():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([{"params": g["params"], "lr": g["lr_scale"]} for g in model.param_groups()])
    query, support = torch.randn(2, 3, 49, 49), torch.randn(2, 1, 3, 49, 49)
    support_mask = (torch.rand(2, 1, 49, 49) > 0.5).float()
    query_mask = (torch.rand(2, 49, 49) > 0.5).long()
    model.train()
    model(query, support, support_mask, query_mask)["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    head = {n for n in before if not n.startswith("backbone.")}
    assert set(lora) <= with_grad <= set(lora) | head
    assert all(n.split(".")[1] in ("layer3", "layer4") for n in lora)
    # what the optimizer steps: the LoRA factors (their own group, lr/10) and the head, nothing else
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in stepped} == set(lora) | {
        n for n in head if dict(model.named_parameters())[n].requires_grad
    }
    assert [g["lr"] for g in optimizer.param_groups if any(".lora_" in names[id(p)] for p in g["params"])] == [0.1]
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= set(lora) | head


def test_lora_without_peft_says_how_to_install(plain, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        apply_strategy(plain("mobilenet_v2"), "lora")


def test_lora_on_dilated_convs_is_the_merged_weight_conv(plain):
    """On the output-stride-8 ResNet (layer3/4 dilated) each LoRA conv computes conv(x, W + s B A) in float64."""
    from torch.nn import functional as F

    backbone = plain("resnet50").double()
    apply_strategy(backbone, "lora:layer4,r=2")
    torch.manual_seed(0)
    checked = 0
    for module in backbone.layer4.modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, nn.Conv2d) or base.dilation == (1, 1):
            continue
        a, b = module.lora_A["default"], module.lora_B["default"]
        with torch.no_grad():
            b.weight.normal_()
            x = torch.randn(1, base.in_channels, 9, 9, dtype=torch.float64)
            delta = torch.einsum("or,rikl->oikl", b.weight[:, :, 0, 0], a.weight) * module.scaling["default"]
            expected = F.conv2d(x, base.weight + delta, base.bias, base.stride, base.padding, base.dilation)
            got = module(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()
        checked += 1
    assert checked == 3  # one dilated 3x3 conv per block of layer4
