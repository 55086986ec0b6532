"""CUDA-only tests: the SVF forms against float64 on the GPU, and checkpoints moved between CPU and GPU.

Marked ``cuda``: ``tests/conftest.py`` skips them where ``torch.cuda.is_available()`` is False. On a machine with a
GPU run ``python -m pytest -m cuda tests/test_cuda.py`` (``benchmarks/gpu_check.py`` does, in its ``cuda_tests``
section). TF32 is off in every test: the tolerances are float32's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures.svf_models import LAYERS, inputs, rel_error, tied_model, trained
from torch import nn
from toys import randomize_norm_stats

import svftune
from svftune.fingerprint import weight_sha256
from svftune.matching import select_layers

pytestmark = pytest.mark.cuda
CROSS_DEVICE_TOL = 1e-5  # relative max-abs output error (as tests/test_checkpoint.py allows another LAPACK)


@pytest.fixture(autouse=True)
def no_tf32():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    return randomize_norm_stats(model, seed=1).eval()


def _move_values(model: nn.Module, seed: int = 0) -> None:
    """Change every singular value by a different amount (as training would), on the model's device."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            noise = torch.randn(layer.S.shape, generator=generator, dtype=torch.float64).to(layer.S)
            layer.S.add_(0.2 * noise * layer.S0.abs().max())


def _x(shape=(4, 3, 16, 16)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5)).cuda()


def _forward_backward(model: nn.Module, x: torch.Tensor, probe: torch.Tensor, form: str, dtype=None):
    for _, layer in svftune.svf_layers(model):
        layer.form = form
        layer.S.grad = None
    model.train()
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x)
    (out.float() * probe).sum().backward()
    return out.detach(), {name: layer.S.grad.clone() for name, layer in svftune.svf_layers(model)}


@pytest.mark.parametrize("form", ["three_op", "rebuilt", "lean"])
def test_forms_match_float64_on_cuda(form):
    model = svftune.apply_svf(_net().cuda())  # decomposed by cuSOLVER
    _move_values(model)
    reference = copy.deepcopy(model).double()
    x, probe = _x(), torch.randn(4, 10, generator=torch.Generator().manual_seed(6)).cuda()
    out, grads = _forward_backward(model, x, probe, form)
    out64, grads64 = _forward_backward(reference, x.double(), probe.double(), "rebuilt")
    assert rel_error(out, out64) <= 1e-5
    for name, grad in grads.items():
        assert rel_error(grad, grads64[name]) <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forms_agree_under_autocast_on_cuda(dtype):
    """three_op and lean run the same ops (lean recomputes the projection): identical outputs and gradients;
    rebuilt is another order of operations: within the half-precision rounding of the float64 result."""
    model = svftune.apply_svf(_net().cuda())
    _move_values(model)
    reference = copy.deepcopy(model).double()
    x, probe = _x(), torch.randn(4, 10, generator=torch.Generator().manual_seed(6)).cuda()
    out64, _ = _forward_backward(reference, x.double(), probe.double(), "rebuilt")
    results = {form: _forward_backward(model, x, probe, form, dtype) for form in ("three_op", "lean", "rebuilt")}
    assert torch.equal(results["three_op"][0], results["lean"][0])
    for name, grad in results["three_op"][1].items():
        assert torch.allclose(grad, results["lean"][1][name], rtol=1e-3, atol=1e-6), name
    for form, (out, _) in results.items():
        assert out.dtype == dtype, form
        assert rel_error(out, out64) <= 3e-2, form


def test_apply_on_cuda_is_bit_identical_and_unapply_restores():
    model = _net().cuda()
    x = _x()
    with torch.no_grad():
        expected = model(x)
    originals = {name: module.weight for name, module in select_layers(model, None)}
    svftune.apply_svf(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)
    _move_values(model)
    with torch.no_grad():
        assert not torch.equal(model(x), expected)
    svftune.unapply_svf(model)
    assert all(model.get_submodule(name).weight is weight for name, weight in originals.items())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)


def test_checkpoint_saved_on_cpu_loads_on_a_cuda_decomposition(tmp_path):
    """Tied singular values (duplicate filters, zero runs, an identity, a symmetric weight): cuSOLVER may pick
    other singular vectors than LAPACK did; the stored bases make the loaded model the trained one."""
    model = trained(tied_model())
    with torch.no_grad():
        expected = model(inputs())
    path = svftune.save_svf(model, tmp_path / "cpu.safetensors")
    loaded = svftune.load_svf(tied_model().cuda(), path)
    with torch.no_grad():
        assert rel_error(loaded(inputs().cuda()), expected) <= CROSS_DEVICE_TOL
    for _, layer in svftune.svf_layers(loaded):
        layer.form = "three_op"
    assert rel_error(loaded.train()(inputs().cuda()), expected) <= CROSS_DEVICE_TOL


def test_checkpoint_saved_on_cuda_loads_on_a_cpu_decomposition(tmp_path):
    model = svftune.apply_svf(tied_model().cuda(), layers=LAYERS)
    _move_values(model, seed=2)
    with torch.no_grad():
        expected = model.eval()(inputs().cuda())
    path = svftune.save_svf(model, tmp_path / "cuda.safetensors")
    loaded = svftune.load_svf(tied_model(), path)
    with torch.no_grad():
        assert rel_error(loaded(inputs()), expected) <= CROSS_DEVICE_TOL


def test_cache_entries_written_on_cpu_are_hit_on_cuda(tmp_path):
    def fingerprints(model):
        return {m.weight.data_ptr(): weight_sha256(m.weight) for _, m in select_layers(model, None)}

    cpu_model = tied_model()
    first = svftune.DecompositionCache(tmp_path)
    svftune.apply_svf(cpu_model, decompose=first.provider(fingerprints(cpu_model)))
    layers = len(svftune.svf_layers(cpu_model))
    assert (first.hits, first.misses) == (0, layers)
    cuda_model = tied_model().cuda()
    second = svftune.DecompositionCache(tmp_path)
    svftune.apply_svf(cuda_model, decompose=second.provider(fingerprints(cuda_model)))
    assert (second.hits, second.misses) == (layers, 0)
    x = inputs().cuda()
    with torch.no_grad():
        assert rel_error(cuda_model(x), svftune.merge_svf(copy.deepcopy(cpu_model)).cuda()(x)) <= 1e-6
