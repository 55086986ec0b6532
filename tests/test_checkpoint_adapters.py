"""Several adapters on one base: named loads, switching without new SVDs, the plain base, exact mixing."""

from __future__ import annotations

import pytest
import torch
from fixtures.svf_models import LAYERS, inputs, rel_error, rotating_svd, tied_model, trained

import svftune
import svftune.layers
from svftune import SVFCheckpointError


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two adapters trained on the same tied base (different values), their outputs and effective weights."""
    folder = tmp_path_factory.mktemp("adapters")
    result = {"base": tied_model()(inputs()).detach()}
    for name, seed in (("a", 1), ("b", 2)):
        model = trained(tied_model(), seed=seed)
        svftune.save_svf(model, folder / f"{name}.safetensors")
        result[name] = model(inputs()).detach()
        result[f"{name}_w"] = {n: layer.merged_weight() for n, layer in svftune.svf_layers(model)}
        result[f"{name}_path"] = folder / f"{name}.safetensors"
    return result


def assert_three_op_agrees(model):
    """The paper's three-op training form (U diag(S) Vh, no W) computes the same function as eval."""
    expected = model.eval()(inputs()).detach()
    for _, layer in svftune.svf_layers(model):
        layer.form = "three_op"
    assert rel_error(model.train()(inputs()), expected) <= 1e-5
    for _, layer in svftune.svf_layers(model):
        layer.form = "auto"
    model.eval()


def effective(model):
    return {name: layer.merged_weight() for name, layer in svftune.svf_layers(model)}


@pytest.fixture
def loaded(two, monkeypatch):
    """A fresh base (decomposed by a 'different LAPACK') with both adapters; later SVDs would fail."""
    model = tied_model()
    with monkeypatch.context() as patch:
        patch.setattr(svftune.layers, "thin_svd", rotating_svd(11))
        svftune.load_svf(model, two["a_path"], adapter_name="a")

    def no_svd(matrices):
        raise AssertionError("decomposed again")

    with monkeypatch.context() as patch:
        patch.setattr(svftune.layers, "thin_svd", no_svd)
        svftune.load_svf(model, two["b_path"], adapter_name="b")
    return model


def test_switching_reproduces_each_adapter_without_new_svds(two, loaded, monkeypatch):
    monkeypatch.setattr(svftune.layers, "thin_svd", None)  # any SVD would fail
    assert svftune.list_adapters(loaded) == ["a", "b"] and svftune.active_adapter(loaded) == "b"
    assert rel_error(loaded(inputs()), two["b"]) <= 1e-5
    svftune.set_adapter(loaded, "a")
    assert rel_error(loaded(inputs()), two["a"]) <= 1e-5
    assert_three_op_agrees(loaded)
    svftune.set_adapter(loaded, "b")
    assert rel_error(loaded(inputs()), two["b"]) <= 1e-5


def test_disable_adapter_runs_exactly_the_base(two, loaded):
    with svftune.disable_adapter(loaded):
        assert torch.equal(loaded(inputs()), two["base"])
        assert svftune.active_adapter(loaded) is None
    assert svftune.active_adapter(loaded) == "b"
    assert rel_error(loaded(inputs()), two["b"]) <= 1e-5


def test_disable_adapter_without_loaded_adapters():
    model = trained(tied_model())
    trained_out = model(inputs()).detach()
    with svftune.disable_adapter(model):
        assert torch.equal(model(inputs()), tied_model()(inputs()))
    assert torch.equal(model(inputs()), trained_out)
    assert svftune.list_adapters(model) == []


def test_mix_is_the_weighted_sum_of_changes_even_in_tied_runs(two, loaded):
    base = {n: layer.base_weight for n, layer in svftune.svf_layers(loaded)}
    svftune.mix_adapters(loaded, {"a": 1.0}, name="only_a")
    assert rel_error(loaded(inputs()), two["a"]) <= 1e-5
    svftune.mix_adapters(loaded, {"a": 0.3, "b": 0.7}, name="ab")
    assert svftune.active_adapter(loaded) == "ab"
    mixed = effective(loaded)
    for name in LAYERS:
        expected = base[name] + 0.3 * (two["a_w"][name] - base[name]) + 0.7 * (two["b_w"][name] - base[name])
        assert rel_error(mixed[name], expected) <= 1e-5, name
    assert_three_op_agrees(loaded)
    svftune.set_adapter(loaded, "a")  # mixing left the others intact
    assert rel_error(loaded(inputs()), two["a"]) <= 1e-5


def test_training_the_active_adapter_is_kept_across_switches(loaded):
    svftune.set_adapter(loaded, "a")
    with torch.no_grad():
        svftune.svf_layers(loaded)[0][1].S.add_(1.0)
    changed = loaded(inputs()).detach()
    svftune.set_adapter(loaded, "b")
    svftune.set_adapter(loaded, "a")
    assert torch.equal(loaded(inputs()), changed)


def test_unknown_names_and_deletion(loaded):
    with pytest.raises(SVFCheckpointError, match="unknown adapter 'c'; the model has 'a', 'b'"):
        svftune.set_adapter(loaded, "c")
    with pytest.raises(SVFCheckpointError, match="unknown adapter 'z'"):
        svftune.mix_adapters(loaded, {"a": 0.5, "z": 0.5})
    svftune.delete_adapter(loaded, "b")
    assert svftune.list_adapters(loaded) == ["a"] and svftune.active_adapter(loaded) is None
    with pytest.raises(SVFCheckpointError, match="no adapters"):
        svftune.set_adapter(tied_model(), "a")


def test_adapter_from_another_base_is_refused_and_changes_nothing(two, loaded, tmp_path):
    other = trained(tied_model(seed=5))
    svftune.save_svf(other, tmp_path / "other.safetensors")
    before = loaded(inputs()).detach()
    with pytest.raises(SVFCheckpointError, match="other base weights"):
        svftune.load_svf(loaded, tmp_path / "other.safetensors", adapter_name="other")
    assert svftune.list_adapters(loaded) == ["a", "b"] and torch.equal(loaded(inputs()), before)


def test_saving_the_active_adapter(two, loaded, tmp_path):
    svftune.set_adapter(loaded, "a")
    svftune.save_svf(loaded, tmp_path / "again.safetensors")
    fresh = svftune.load_svf(tied_model(), tmp_path / "again.safetensors")
    assert rel_error(fresh(inputs()), two["a"]) <= 1e-5
