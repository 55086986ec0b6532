"""Trained singular values survive being held as ``S - S0`` bit for bit (float64 ones within one rounding): in
adapters, on switching, in checkpoints.

``S0 + (S - S0)`` in S's own dtype is exact only while S stays within a factor of two of S0; a small singular value
trained far from its start (seen on GPT-2's square c_proj layers) came back one unit in the last place off.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import svftune
from svftune._values import change, keep_precision, restore

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _values(dtype: torch.dtype, n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Base values spread over six decades and trained values from 1e-4 to 1e4 times them, some negative or 0."""
    generator = torch.Generator().manual_seed(0)
    base = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-7, 7, generator=generator))
    factor = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-9, 9, generator=generator))
    sign = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.1, -1.0, 1.0)
    values = base * factor * sign
    values[:10] = 0.0
    values[10:20] = base[10:20]  # unchanged
    limit = torch.finfo(dtype).max / 4
    return base.clamp(max=limit).to(dtype), values.clamp(-limit, limit).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_change_and_restore_give_every_value_back_where_plain_arithmetic_does_not(dtype):
    base, values = _values(dtype)
    delta = change(values, base)
    back = restore(base, delta, dtype)
    if dtype == torch.float64:  # no wider dtype: within one rounding of the larger of S and S0
        bound = torch.finfo(dtype).eps * torch.maximum(base.abs(), values.abs())
        assert ((back - values).abs() <= bound).all()
    else:
        assert torch.equal(back, values)
        assert not torch.equal(base + (values - base), values), "the data holds values plain arithmetic loses"


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=str)
def test_a_change_within_a_factor_of_two_stays_in_the_values_dtype(dtype):
    base, _ = _values(dtype)
    values = (base.double() * torch.linspace(0.55, 1.9, base.numel(), dtype=torch.float64)).to(dtype)
    delta = change(values, base)
    assert delta.dtype == dtype and torch.equal(delta, values - base)


def test_keep_precision_widens_only_up_to_the_exact_dtype():
    like = torch.ones(3, dtype=torch.float32)
    assert keep_precision(torch.ones(3, dtype=torch.float64), like).dtype == torch.float64
    assert keep_precision(torch.ones(3, dtype=torch.float16), like).dtype == torch.float32
    half = torch.ones(3, dtype=torch.bfloat16)
    assert keep_precision(torch.ones(3, dtype=torch.float32), half).dtype == torch.float32


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 6))


def _train_far(model: nn.Module) -> None:
    """Move every singular value far from its start: the smaller half shrinks 50x, the rest grows 3x."""
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            s = layer.S
            small = s < s.median()
            s.copy_(torch.where(small, s / 50.0 + 1e-9, s * 3.0 + 1e-4))


def _s(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.S.detach().clone() for name, layer in svftune.svf_layers(model)}


def _stored_dtype(path) -> str:
    with safe_open(str(path), "pt") as file:
        return str(file.get_slice("delta_S").get_dtype())


def test_a_checkpoint_of_far_trained_values_loads_them_bit_for_bit(tmp_path):
    model = svftune.apply_svf(_model())
    _train_far(model)
    layers = [layer for _, layer in svftune.svf_layers(model)]
    assert any(not torch.equal(x.S0 + (x.S - x.S0), x.S) for x in layers), "test data"
    svftune.save_svf(model, tmp_path / "far.safetensors")
    assert _stored_dtype(tmp_path / "far.safetensors") == "F64"
    loaded = svftune.load_svf(_model(), tmp_path / "far.safetensors")
    trained, back = _s(model), _s(loaded)
    assert all(torch.equal(trained[n], back[n]) for n in trained)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_a_checkpoint_of_near_values_keeps_their_dtype(tmp_path):
    model = svftune.apply_svf(_model())
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            layer.S.mul_(1.3)
    svftune.save_svf(model, tmp_path / "near.safetensors")
    assert _stored_dtype(tmp_path / "near.safetensors") == "F32"
    loaded = svftune.load_svf(_model(), tmp_path / "near.safetensors")
    trained, back = _s(model), _s(loaded)
    assert all(torch.equal(trained[n], back[n]) for n in trained)


def test_switching_adapters_away_and_back_keeps_far_trained_values(tmp_path):
    trained = svftune.apply_svf(_model())
    _train_far(trained)
    svftune.save_svf(trained, tmp_path / "a.safetensors")
    model = svftune.load_svf(_model(), tmp_path / "a.safetensors", adapter_name="a")
    svftune.load_svf(model, tmp_path / "a.safetensors", adapter_name="b")
    _train_far(model)  # adapter "b" trains further in the layers
    values_b = _s(model)
    svftune.set_adapter(model, "a")
    assert all(torch.equal(_s(trained)[n], v) for n, v in _s(model).items())
    with svftune.disable_adapter(model):  # the plain base in the layers, then a's values again
        assert all(torch.equal(layer.S, layer.S0) for _, layer in svftune.svf_layers(model))
    assert all(torch.equal(_s(trained)[n], v) for n, v in _s(model).items())
    svftune.set_adapter(model, "b")  # b's values were synced out of the layers as S - S0 and written back
    assert all(torch.equal(values_b[n], v) for n, v in _s(model).items())
