"""apply_svf behaviour: selection, freezing, copies, caching, serialization, dtypes, compile, and every error."""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from torch import nn
from toys import build_toy, perturb_singular_values, randomize_norm_stats, reference_weight, relative_error

import svftune
from svftune.layers import SVFConv2d, SVFLinear


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn1(self.conv1(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = Block(8)
        self.layer2 = Block(8)
        self.layer20 = Block(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layer20(self.layer2(self.layer1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def make_net() -> Net:
    torch.manual_seed(0)
    return randomize_norm_stats(Net())


ALL_LAYERS = ["stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer20.conv1"]
ALL_LAYERS += ["layer20.conv2", "head"]


def adapted_names(model: nn.Module) -> list[str]:
    return [name for name, _ in svftune.svf_layers(model)]


# ------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (["layer2"], ["layer2.conv1", "layer2.conv2"]),  # a prefix stops at a name boundary: not layer20
        ("layer2", ["layer2.conv1", "layer2.conv2"]),
        ("layer(1|20)", ["layer1.conv1", "layer1.conv2", "layer20.conv1", "layer20.conv2"]),
        (r"layer\d+\.conv1", ["layer1.conv1", "layer2.conv1", "layer20.conv1"]),
        (lambda name, module: isinstance(module, nn.Linear), ["head"]),
        (None, [*ALL_LAYERS]),
    ],
)
def test_layer_selection_forms(layers, expected):
    assert adapted_names(svftune.apply_svf(make_net(), layers)) == expected


def test_targets_and_exclude():
    model = svftune.apply_svf(make_net(), targets=[nn.Linear])
    assert adapted_names(model) == ["head"]
    model = svftune.apply_svf(make_net(), ["layer1", "layer2"], exclude=r"layer\d\.conv2")
    assert adapted_names(model) == ["layer1.conv1", "layer2.conv1"]
    model = svftune.apply_svf(make_net(), ["layer1"], exclude=["layer1.conv1"])
    assert adapted_names(model) == ["layer1.conv2"]


def test_apply_twice_to_other_layers_accumulates_config():
    model = svftune.apply_svf(make_net(), ["layer1"])
    svftune.apply_svf(model, ["layer2"])
    assert model.svf_config.layer_names == ["layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"]
    svftune.unapply_svf(model)
    assert all(p.requires_grad for p in model.parameters()), "original flags come back after two applies"


# ------------------------------------------------------------------------------------------- freezing, copies
def test_everything_but_s_frozen_and_bn_stays_in_eval():
    model = svftune.apply_svf(make_net(), ["layer1"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer1.conv1.S", "layer1.conv2.S"}
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.layer1.conv1.training
    stats = model.layer2.bn1.running_mean.clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.equal(model.layer2.bn1.running_mean, stats)


def test_freeze_bn_false_and_freeze_others_false():
    model = svftune.apply_svf(make_net(), ["layer1"], freeze_bn=False, freeze_others=False)
    model.train()
    assert model.layer1.bn1.training
    assert model.head.weight.requires_grad and model.layer1.bn1.weight.requires_grad
    assert not model.layer1.conv1.base_weight.requires_grad


def test_freeze_batchnorm_survives_sync_batchnorm_conversion_when_called_again():
    model = svftune.apply_svf(make_net(), ["layer1"])
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert svftune.freeze_batchnorm(converted) == 3
    converted.train()
    assert not any(m.training for m in converted.modules() if isinstance(m, nn.SyncBatchNorm))


def test_inplace_false_leaves_model_untouched():
    model = make_net()
    state = copy.deepcopy(model.state_dict())
    adapted = svftune.apply_svf(model, ["layer1"], inplace=False)
    assert adapted is not model and adapted_names(adapted) == ["layer1.conv1", "layer1.conv2"]
    assert not any(isinstance(m, svftune.SVFLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, "svf_config")
    model.train()
    assert model.layer1.bn1.training


# ------------------------------------------------------------------------------------------- caching
def test_eval_weight_cache_follows_in_place_updates_and_state_dict_loads():
    model, x = build_toy("conv2d_3x3")
    svftune.apply_svf(model)
    layer = model[0]
    model.eval()
    with torch.no_grad():
        first = model(x)
        assert layer._cached_weight() is layer.base_weight, "untouched S: the original weight itself"
        layer.S.mul_(1.1)  # what an optimizer step does
        second = model(x)
        assert relative_error(layer._cached_weight(), reference_weight(layer)) < 1e-6
        assert layer._cached_weight() is layer._cached_weight(), "cached between calls"
    assert not torch.equal(first, second)
    trained = copy.deepcopy(model.state_dict())
    fresh, _ = build_toy("conv2d_3x3")
    svftune.apply_svf(fresh)
    fresh.eval()
    with torch.no_grad():
        fresh(x)  # fills the cache with the untouched weight
        fresh.load_state_dict(trained)
        assert torch.equal(fresh(x), second)


def test_weight_property_differentiable_for_external_readers():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # same code path (the fused fast path) as the check below
        expected, _ = copy.deepcopy(attention).eval()(x, x, x)
    model = nn.Sequential()
    model.add_module("attn", attention)
    svftune.apply_svf(model)
    assert isinstance(attention.out_proj, SVFLinear)  # nn.MultiheadAttention reads out_proj.weight itself
    attention.eval()
    with torch.no_grad():
        assert torch.equal(attention(x, x, x)[0], expected)
    perturb_singular_values(model)
    out, _ = attention.train()(x, x, x)
    out.square().sum().backward()
    assert attention.out_proj.S.grad is not None and attention.out_proj.S.grad.abs().sum() > 0
    merged = svftune.merge_svf(copy.deepcopy(model))
    with torch.no_grad():
        assert relative_error(merged.attn.eval()(x, x, x)[0], attention.eval()(x, x, x)[0]) < 1e-5


# ------------------------------------------------------------------------------------------- cost model
def test_cost_model_picks_the_cheaper_form():
    torch.manual_seed(0)
    conv3 = SVFConv2d(nn.Conv2d(64, 64, 3, padding=1))
    assert conv3.uses_three_op(torch.randn(4, 64, 28, 28, requires_grad=True))
    square = SVFLinear(nn.Linear(64, 64))
    assert not square.uses_three_op(torch.randn(1000, 64, requires_grad=True)), "many tokens: rebuilt"
    assert square.uses_three_op(torch.randn(4, 64, requires_grad=True)), "few tokens: rebuilding W costs more"
    lopsided = SVFConv2d(nn.Conv2d(256, 32, 1))
    assert lopsided.uses_three_op(torch.randn(2, 256, 28, 28, requires_grad=True))
    downsample = SVFConv2d(nn.Conv2d(256, 512, 1, stride=2))  # rebuilt has fewer multiply-adds, but its
    assert downsample.uses_three_op(torch.randn(1, 256, 120, 120)), "weight-gradient conv is slower per MAC"
    forced = SVFConv2d(nn.Conv2d(64, 64, 3, padding=1), form="rebuilt")
    assert not forced.uses_three_op(torch.randn(4, 64, 28, 28))
    forced.form = "three_op"
    assert forced.uses_three_op(torch.randn(1000, 64, 1, 1))


# ------------------------------------------------------------------------------------------- serialization
def test_state_dict_deepcopy_pickle_and_to_round_trips():
    model, x = build_toy("conv2d_grouped")
    svftune.apply_svf(model)
    perturb_singular_values(model)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    for clone in copies:
        with torch.no_grad():
            assert torch.equal(clone.eval()(x), expected)
        clone.train()
        assert not clone[1].training, "BatchNorm stays frozen in the copy"
        assert clone[1].train is not model[1].train
    fresh, _ = build_toy("conv2d_grouped", seed=5)
    svftune.apply_svf(fresh)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
        doubled = copy.deepcopy(model).to(torch.float64)
        assert doubled[0].S.dtype == torch.float64
        assert relative_error(doubled(x.double()), expected) < 1e-5


# ------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model, x = build_toy("conv2d_3x3", dtype=dtype)
    expected = copy.deepcopy(model).eval()(x)
    svftune.apply_svf(model)
    layer = model[0]
    assert layer.S.dtype == torch.float32, "singular values train in float32 so small updates are not lost"
    assert layer.U.dtype == dtype and layer.base_weight.dtype == dtype
    assert torch.equal(model.eval()(x), expected)
    model.train()
    for form in ("three_op", "rebuilt", "lean"):
        layer.form = form
        layer.S.grad = None
        out = model(x)
        assert out.dtype == dtype
        out.float().square().mean().backward()
        assert layer.S.grad.dtype == torch.float32 and torch.isfinite(layer.S.grad).all()
    merged = svftune.merge_svf(model)
    assert merged[0].weight.dtype == dtype


@pytest.mark.parametrize("form", ["three_op", "lean"])
def test_autocast_training_step(form):
    model, x = build_toy("conv2d_3x3")
    svftune.apply_svf(model, form=form)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()  # outside autocast: the lean form replays the forward's state
    assert model[0].S.grad.dtype == torch.float32 and model[0].S.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- lean form
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", ["conv2d_3x3", "conv2d_grouped", "conv1d", "mlp", "conv2d_reflect"])
def test_lean_form_equals_three_op_bit_for_bit(name, autocast):
    """Recomputing the Vh projection in the backward gives exactly the three-op form's outputs and gradients."""
    model, x = build_toy(name)
    svftune.apply_svf(model, form="three_op")
    perturb_singular_values(model)
    results = {}
    for form in ("three_op", "lean"):
        for _, layer in svftune.svf_layers(model):
            layer.form = form
            layer.S.grad = None
        x_in = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.train()(x_in)
        out.float().square().mean().backward()
        results[form] = (out, x_in.grad, [layer.S.grad.clone() for _, layer in svftune.svf_layers(model)])
    (out3, gx3, gs3), (outl, gxl, gsl) = results["three_op"], results["lean"]
    assert torch.equal(out3, outl) and torch.equal(gx3, gxl)
    assert all(torch.equal(a, b) for a, b in zip(gs3, gsl, strict=True))


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves during a forward, parameters and buffers not counted."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum().backward()
    return sum(storages.values())


def test_lean_form_saves_no_more_than_direct_fine_tuning():
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
    )  # fmt: skip
    x = torch.randn(2, 8, 24, 24)
    direct = copy.deepcopy(plain).train()
    svftune.freeze_batchnorm(direct)
    saved = {"direct": saved_activation_bytes(direct, x)}
    for form in ("three_op", "lean"):
        saved[form] = saved_activation_bytes(svftune.apply_svf(copy.deepcopy(plain), form=form).train(), x)
    z_bytes = 4 * 2 * 24 * 24 * (32 + 32 + 32)  # one R-channel map per layer (R = 32, 32, min(64, 32))
    x_bytes = 4 * x.numel()  # direct keeps the network input for the first weight gradient; three-op does not
    assert saved["three_op"] == saved["direct"] - x_bytes + z_bytes
    assert saved["lean"] <= saved["direct"]


# ------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("form", ["three_op", "lean"])
def test_torch_compile_training_matches_eager(form):
    model, x = build_toy("conv2d_3x3")
    svftune.apply_svf(model, form=form)
    perturb_singular_values(model)
    eager = copy.deepcopy(model).train()
    eager(x).square().mean().backward()
    compiled = torch.compile(model.train())  # inductor: generates and builds C++ kernels (~30 s here)
    compiled(x).square().mean().backward()
    assert relative_error(model[0].S.grad, eager[0].S.grad) < 1e-5
    with torch.no_grad():
        assert relative_error(compiled.eval()(x), eager.eval()(x)) < 1e-6


# ------------------------------------------------------------------------------------------- errors
def error_message(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_error_nothing_matched_lists_the_model():
    message = error_message(ValueError, svftune.apply_svf, make_net(), "block")
    assert "matched no layer" in message and "layer20 (Block: 2 Conv2d)" in message and "1 Linear" in message


def test_error_prefix_typo():
    message = error_message(ValueError, svftune.apply_svf, make_net(), ["layer1", "layr2"])
    assert "'layr2' matches no module" in message and "stem (Conv2d" in message
    message = error_message(ValueError, svftune.apply_svf, make_net(), ["layer1"], exclude=["layer1.cnv1"])
    assert "exclude entry 'layer1.cnv1'" in message


def test_error_bad_arguments():
    assert "not a valid regular expression" in error_message(ValueError, svftune.apply_svf, make_net(), "layer[")
    assert "list of module-name prefixes" in error_message(TypeError, svftune.apply_svf, make_net(), 5)
    assert "list of module-name prefixes" in error_message(TypeError, svftune.apply_svf, make_net(), [])
    message = error_message(TypeError, svftune.apply_svf, make_net(), targets=[nn.BatchNorm2d])
    assert "targets may only hold" in message
    assert "train='X'" in error_message(ValueError, svftune.apply_svf, make_net(), train="X")
    assert "form='fast'" in error_message(ValueError, svftune.apply_svf, make_net(), form="fast")
    assert "expects a torch.nn.Module" in error_message(TypeError, svftune.apply_svf, "resnet50")
    assert "bare Conv2d" in error_message(ValueError, svftune.apply_svf, nn.Conv2d(3, 4, 3))
    assert "SVFConv2d wraps a Conv2d, got Linear" in error_message(TypeError, SVFConv2d, nn.Linear(3, 4))


def test_error_applying_twice():
    model = svftune.apply_svf(make_net(), ["layer1"])
    message = error_message(ValueError, svftune.apply_svf, model, ["layer1"])
    assert "already applied to layer1.conv1, layer1.conv2" in message and "unapply_svf" in message
    assert "already applied" in error_message(ValueError, svftune.apply_svf, model)


class WeightStandardizedConv2d(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class PlainSubclassLinear(nn.Linear):
    """A subclass that does not change the computation (like nn.MultiheadAttention's out_proj class)."""


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        (nn.ConvTranspose2d(4, 4, 3), "transposed convolution"),
        (nn.LazyConv2d(4, 3), "lazy module"),
        (WeightStandardizedConv2d(4, 4, 3), "overrides forward()"),
        (nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3)), "parametrization"),
    ],
)
def test_error_unsupported_layer_kinds(layer, fragment):
    model = nn.Sequential(nn.Conv2d(4, 4, 1), layer)
    message = error_message(TypeError, svftune.apply_svf, model)
    assert re.search(rf"\n  1: .*{re.escape(fragment)}", message), message
    assert "exclude" in message or "forward pass" in message
    assert not any(isinstance(m, svftune.SVFLayer) for m in model.modules()), "nothing applied on error"
    if isinstance(layer, nn.LazyConv2d):
        message = error_message(ValueError, svftune.apply_svf, model, exclude=["1"])
        assert "run one forward pass" in message and "1.weight" in message
    else:
        assert adapted_names(svftune.apply_svf(model, exclude=["1"])) == ["0"]


def test_error_hooks_would_be_lost_and_plain_subclass_is_fine():
    model = nn.Sequential(nn.Linear(4, 4), PlainSubclassLinear(4, 2))
    model[0].register_forward_hook(lambda *args: None)
    assert "hooks registered" in error_message(TypeError, svftune.apply_svf, model)
    svftune.apply_svf(model, ["1"])
    assert type(svftune.unapply_svf(model)[1]) is PlainSubclassLinear


def test_quickstart_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "quickstart.py"
    args = [sys.executable, str(script), "--steps", "2", "--batch-size", "2", "--image-size", "64"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "trainable params: 33,034" in result.stdout
    assert "merged vs unmerged output: relative difference" in result.stdout


def test_decompose_hook_replaces_the_svd():
    calls = []

    def recording_svd(matrices):
        calls.append(tuple(matrices.shape))
        return svftune.thin_svd(matrices)

    model = svftune.apply_svf(make_net(), ["layer1"], decompose=recording_svd)
    assert calls == [(1, 8, 72), (1, 8, 8)]
    assert adapted_names(model) == ["layer1.conv1", "layer1.conv2"]


# ------------------------------------------------------------------------------------------- ties, saving, verbs
def test_merge_and_unapply_without_svf_layers_are_errors():
    assert "has no SVF layers" in error_message(ValueError, svftune.merge_svf, make_net())
    assert "has no SVF layers" in error_message(ValueError, svftune.unapply_svf, make_net())
    model = svftune.apply_svf(make_net(), ["layer1"])
    svftune.merge_svf(model)
    assert "already removed them" in error_message(ValueError, svftune.merge_svf, model)


def test_modules_to_save_train_fully_and_are_recorded():
    model = svftune.apply_svf(make_net(), ["layer1"], modules_to_save=["layer2", "head"])
    assert svftune.model.modules_to_save(model) == ["layer2", "head"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"layer1.conv1.S", "layer1.conv2.S", "head.weight", "head.bias"}
    expected |= {n for n, _ in model.layer2.named_parameters(prefix="layer2")}
    assert trainable == expected
    model.train()
    assert model.layer2.bn1.training and not model.layer1.bn1.training, "a saved module's norm layers train"
    message = error_message(ValueError, svftune.apply_svf, make_net(), ["layer1"], modules_to_save=["layer1"])
    assert "contains layers selected for SVF" in message
    assert "'hed' matches no module" in error_message(
        ValueError, svftune.apply_svf, make_net(), modules_to_save=["hed"]
    )
    svftune.unapply_svf(model)
    assert svftune.model.modules_to_save(model) == []


def test_block_reused_at_two_places_is_refused_or_kept_tied():
    model = make_net()
    model.layer20 = model.layer2  # weight sharing across blocks
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
    message = error_message(ValueError, svftune.apply_svf, model, ["layer2"])
    assert "layer2.conv1.weight is also layer20.conv1.weight" in message and "tied='keep'" in message
    assert not svftune.svf_layers(model)
    svftune.apply_svf(model, ["layer2"], tied="keep")
    assert model.layer20.conv1 is model.layer2.conv1 and isinstance(model.layer2.conv1, SVFConv2d)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)
    perturb_singular_values(model)
    merged = svftune.merge_svf(model)
    assert merged.layer20.conv1 is merged.layer2.conv1 and type(merged.layer2.conv1) is nn.Conv2d


def test_two_linears_sharing_one_parameter_kept_tied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = model(x)
    svftune.apply_svf(model, tied="keep")
    assert [n for n, _ in svftune.svf_layers(model)] == ["0"], "the shared weight is adapted once"
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    model.train()
    model(x).square().sum().backward()
    assert model[0].S.grad is not None
    restored = svftune.unapply_svf(model)
    assert restored[2].weight is restored[0].weight and isinstance(restored[0], nn.Linear)


def test_root_path_that_is_also_a_deeper_name_warns():
    model = make_net()
    model.layer1.stem = nn.Conv2d(8, 8, 1)  # a deeper module named like the root `stem`
    with pytest.warns(svftune.SVFSelectionWarning, match=r"'stem' is a module path from the root .*layer1\.stem"):
        assert adapted_names(svftune.apply_svf(model, ["stem"])) == ["stem"]
