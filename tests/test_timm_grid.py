"""timm backbones through the shared SVF checks (checks.py), built with ``pretrained=False``: no downloads.

For every entry of ``TEST_CASES`` (``timm.create_model(model, pretrained=False, num_classes=10, **kwargs)``, random
weights made non-trivial first: random biases, norm affines and layer scales, BatchNorm statistics from random
batches):

a. ``apply_svf`` adapts every Conv/Linear layer (all but the excluded ones), eval output bit-identical at init;
b. in float64 with the three-op form on every layer, train mode is within ``RTOL_TRAIN_FP64`` of the plain model with
   frozen BatchNorm under the same RNG seed (dropout, stochastic depth), and eval stays bit-identical;
c. SGD steps change ``S`` and nothing else; with a new head in ``modules_to_save``, ``S`` and the head only;
d. ``save_svf`` -> ``load_svf`` onto a fresh base built with the same seed reproduces the tuned outputs bit for bit
   (the head included), and ``merge_svf``'s ``state_dict`` loads with ``strict=True`` into a plain
   ``timm.create_model`` of the same name, which then computes the merged outputs bit for bit;
e. ``merge_svf`` (plain timm classes, weights rounded once) and ``unapply_svf`` (bit for bit) on a perturbed model;
f. timm's ``Conv2dSame`` (TensorFlow "same" padding computed in ``forward``, in ``tf_efficientnet_*``) and timm's
   ``Linear`` (MobileNetV3's classifier) override ``forward``: ``apply_svf`` refuses them with an error naming every
   such layer and applies nothing; excluded, the rest of those models runs the grid above.

Skipped when timm is not installed (it is in the ``dev`` extra).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from checks import (
    check_eval_exact_at_init,
    check_merge,
    check_only_s_trains,
    check_train_close,
    check_unapply,
    make_nontrivial,
    module_classes,
    random_images,
    relative_error,
    requires_grad_flags,
)
from torch import Tensor, nn
from toys import perturb_singular_values

import svftune
from svftune.layers import layer_kind

timm = pytest.importorskip("timm")

RTOL_TRAIN_FP64 = 1e-10
RTOL_MERGE = 1e-4  # fp32 on random-weight nets, as in the torchvision grid; merged weights are checked elementwise
NUM_CLASSES = 10
BATCH = 2
DROP = {"drop_rate": 0.1, "drop_path_rate": 0.1}  # dropout and stochastic depth on: train mode draws random masks


def _refused(name: str, module: nn.Module) -> bool:
    """The timm layers SVF refuses, as subclasses that override forward: Conv2dSame (it pads the input first) and
    timm's Linear (the classifier of MobileNetV3, GhostNet, LCNet; it casts under TorchScript)."""
    return isinstance(module, (timm.layers.Conv2dSame, timm.layers.Linear))


@dataclass(frozen=True)
class Case:
    model: str
    kwargs: dict = field(default_factory=dict)
    size: int = 64  # input height and width
    exclude: Callable[[str, nn.Module], bool] | None = None


TEST_CASES = [
    Case("resnet18"),
    # ResNet-50's bottleneck layout, the depth cut to one block per stage (timm's ResNet takes `layers`).
    Case("resnet50", {"layers": [1, 1, 1, 1], **DROP}),
    # ConvNeXt-T's block (depthwise 7x7 conv, channels-last LayerNorm, two Linear, layer scale) at atto width.
    Case("convnext_atto", {"conv_mlp": False, **DROP}),
    # The real ViT-Ti/16 (12 blocks, width 192, Linear qkv) on 32 px inputs: 4 patches and the class token.
    Case("vit_tiny_patch16_224", {"img_size": 32, "attn_drop_rate": 0.1, "proj_drop_rate": 0.1, **DROP}, size=32),
    Case("efficientnet_b0", DROP),
    Case("regnetx_002", DROP),
    # Five Conv2dSame (the stride-2 convs) left out; the stride-1 "same" convs are plain Conv2d and adapted.
    Case("tf_efficientnet_b0", DROP, exclude=_refused),
    Case("mobilenetv3_small_050", DROP, exclude=_refused),  # its classifier is a timm Linear, left out
]


def _inputs(size: int, seed: int, batch: int = BATCH, dtype: torch.dtype = torch.float32) -> Tensor:
    return random_images(size, seed, batch, dtype)


def _create(case: Case) -> nn.Module:
    return timm.create_model(case.model, pretrained=False, num_classes=NUM_CLASSES, **case.kwargs)


def _build(case: Case) -> nn.Module:
    """The base model: the same weights at every call (seeded), with mixed requires_grad flags so that restoring
    them after merge/unapply is not vacuous."""
    torch.manual_seed(0)
    model = _create(case)
    make_nontrivial(model, case.size)
    next(model.parameters()).requires_grad_(False)
    return model


def _excluded(case: Case, names: list[str] | tuple[str, ...] = ()) -> Callable[[str, nn.Module], bool] | None:
    if case.exclude is None and not names:
        return None
    return lambda name, module: name in names or (case.exclude is not None and case.exclude(name, module))


def _head_name(model: nn.Module) -> str:
    head = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is head)


def _loss(case: Case) -> Callable[[nn.Module, int], Tensor]:
    generator = torch.Generator().manual_seed(7)

    def loss(model: nn.Module, step: int) -> Tensor:
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
        return F.cross_entropy(model(_inputs(case.size, 10 + step)), labels)

    return loss


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Single-threaded: many small ops, and two OpenMP threads on a loaded 2-core machine slow them down a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=TEST_CASES, ids=lambda case: case.model)
def case(request) -> tuple[Case, nn.Module, nn.Module]:
    spec = request.param
    original = _build(spec)
    adapted = svftune.apply_svf(copy.deepcopy(original), exclude=_excluded(spec), progress=False)
    return spec, original, adapted


def test_every_layer_adapted_exact_at_init(case):
    spec, original, adapted = case
    expected = [
        name
        for name, m in original.named_modules()
        if layer_kind(m) is not None and not (spec.exclude is not None and spec.exclude(name, m))
    ]
    assert [name for name, _ in svftune.svf_layers(adapted)] == expected
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if not n.endswith(".S"))
    check_eval_exact_at_init(original, adapted, _inputs(spec.size, 1))


def test_float64_three_op_matches_plain_model_with_frozen_bn(case):
    spec, original, _ = case
    original = copy.deepcopy(original).double()
    svf = svftune.apply_svf(copy.deepcopy(original), exclude=_excluded(spec), form="three_op", progress=False)
    reference = copy.deepcopy(original)
    svftune.freeze_batchnorm(reference)
    x = _inputs(spec.size, 2, dtype=torch.float64)
    check_train_close(svf, reference, x, RTOL_TRAIN_FP64)
    assert all(not m.training for m in svf.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    check_eval_exact_at_init(original, svf, x)


def test_sgd_changes_only_singular_values(case):
    spec, _, adapted = case
    check_only_s_trains(copy.deepcopy(adapted), _loss(spec), steps=2)


def test_new_head_save_load_and_merge_into_plain_timm_model(case, tmp_path):
    spec, original, _ = case
    model = copy.deepcopy(original)
    head = _head_name(model)
    svftune.apply_svf(model, exclude=_excluded(spec, [head]), modules_to_save=[head], progress=False)
    head_parameters = [f"{head}.{name}" for name, _ in model.get_submodule(head).named_parameters()]
    check_only_s_trains(model, _loss(spec), steps=1, also_trains=head_parameters)
    x = _inputs(spec.size, 4)
    with torch.no_grad():
        tuned = model.eval()(x)

    path = svftune.save_svf(model, tmp_path / "svf.safetensors")
    base = _build(spec)  # a fresh base: the same seed gives the same weights
    svftune.load_svf(base, path)
    assert requires_grad_flags(base) == requires_grad_flags(model)
    with torch.no_grad():
        assert torch.equal(base.eval()(x), tuned), "load_svf onto a fresh base does not reproduce the tuned model"

    merged = svftune.merge_svf(base).eval()
    assert module_classes(merged) == module_classes(original)
    torch.manual_seed(1)
    plain = _create(spec).eval()  # other random weights: everything must come from the state_dict
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        out = plain(x)
        assert torch.equal(out, merged(x))
    error = relative_error(out, tuned)
    assert error <= RTOL_MERGE, f"{spec.model}: merged model {error:.2e} off the tuned one"


def test_merge_and_unapply(case):
    spec, original, adapted = case
    model = copy.deepcopy(adapted)
    perturb_singular_values(model, scale=0.1, seed=5)
    x = _inputs(spec.size, 6)
    with torch.no_grad():
        assert relative_error(model.eval()(x), original.eval()(x)) > 1e-3, "the perturbation must change the output"
    check_merge(model, original, x, RTOL_MERGE)
    check_unapply(model, original, x)


@pytest.mark.parametrize(
    ("model", "refused", "count", "description"),
    [
        ("tf_efficientnet_b0", "Conv2dSame", 5, "is a Conv2dSame, a subclass of Conv2d that overrides forward()"),
        ("mobilenetv3_small_050", "Linear", 1, "is a Linear, a subclass of Linear that overrides forward()"),
    ],
)
def test_timm_subclasses_refused_by_name_and_nothing_applied(model, refused, count, description):
    net = _build(next(case for case in TEST_CASES if case.model == model))
    names = [name for name, m in net.named_modules() if _refused(name, m)]
    assert len(names) == count and all(type(net.get_submodule(n)).__name__ == refused for n in names), names
    classes, flags = module_classes(net), requires_grad_flags(net)
    with pytest.raises(TypeError, match=r"apply_svf selected layers it cannot adapt") as info:
        svftune.apply_svf(net, progress=False)
    for name in names:
        assert f"\n  {name}: {description}" in str(info.value)
    assert "leave it out with exclude=[...]" in str(info.value)
    with pytest.raises(TypeError, match=rf"{names[0]}: is a {refused}"):
        svftune.apply_svf(net, layers=[names[0]], progress=False)
    assert not svftune.svf_layers(net), "nothing applied on error"
    assert module_classes(net) == classes and requires_grad_flags(net) == flags
    svftune.apply_svf(net, exclude=names, progress=False)  # the names from the message, as a list
    assert {n: type(net.get_submodule(n)) for n in names} == {n: classes[n] for n in names}
