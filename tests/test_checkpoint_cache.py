"""The opt-in decomposition cache: a second load skips the SVDs; stale or damaged entries are never trusted."""

from __future__ import annotations

import pytest
import torch
from fixtures.svf_models import LAYERS, inputs, rel_error, tied_model, trained

import svftune
import svftune.cache


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "c.safetensors"
    model = trained(tied_model())
    svftune.save_svf(model, path)
    return path, model(inputs()).detach()


def entries(cache):
    return sorted(cache.rglob("*.safetensors"))


def no_svd(matrices):
    raise AssertionError("the cache should have served this decomposition")


def test_second_load_is_served_from_the_cache_bit_for_bit(checkpoint, tmp_path, monkeypatch):
    path, expected = checkpoint
    plain = svftune.load_svf(tied_model(), path)
    first = svftune.load_svf(tied_model(), path, cache_dir=tmp_path)
    assert len(entries(tmp_path)) == len(LAYERS)
    monkeypatch.setattr(svftune.cache, "thin_svd", no_svd)
    second = svftune.load_svf(tied_model(), path, cache_dir=tmp_path)
    assert rel_error(second(inputs()), expected) <= 1e-5
    for model in (first, second):
        for (_, a), (_, b) in zip(svftune.svf_layers(plain), svftune.svf_layers(model), strict=True):
            assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def _corrupt_values(entry):
    data = bytearray(entry.read_bytes())
    data[-200:-100] = bytes(100)  # zero a stretch of factor values: still a valid file
    entry.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: e.write_bytes(e.read_bytes()[:-50]),  # truncated
        lambda e: e.write_bytes(b""),  # empty
        _corrupt_values,  # bytes changed inside the tensors
    ],
    ids=["truncated", "empty", "values"],
)
def test_damaged_entries_are_discarded_and_recomputed(checkpoint, tmp_path, damage):
    path, expected = checkpoint
    svftune.load_svf(tied_model(), path, cache_dir=tmp_path)
    for entry in entries(tmp_path):
        damage(entry)
    with pytest.warns(UserWarning, match="discarding"):
        model = svftune.load_svf(tied_model(), path, cache_dir=tmp_path)
    assert rel_error(model(inputs()), expected) <= 1e-5
    assert len(entries(tmp_path)) == len(LAYERS)  # rewritten


def test_an_entry_of_other_weights_is_not_used(checkpoint, tmp_path):
    """An entry copied over another key (a stale or mixed-up cache) fails the checks against the weight."""
    path, expected = checkpoint
    svftune.load_svf(tied_model(), path, cache_dir=tmp_path)
    files = entries(tmp_path)
    data = files[0].read_bytes()
    for entry in files[1:]:
        entry.write_bytes(data)
    with pytest.warns(UserWarning, match="discarding"):
        model = svftune.load_svf(tied_model(), path, cache_dir=tmp_path)
    assert rel_error(model(inputs()), expected) <= 1e-5


def test_svd_check_rejects_a_wrong_basis():
    matrices = torch.randn(1, 6, 9, dtype=torch.float64)
    u, s, vh = svftune.thin_svd(matrices)
    assert svftune.cache.svd_problem(matrices, u, s, vh) is None
    bad = u.clone()
    bad[0, :, [0, 1]] = bad[0, :, [1, 0]]
    assert "not an SVD" in svftune.cache.svd_problem(matrices, bad, s, vh)
    assert "sorted" in svftune.cache.svd_problem(matrices, u, s.flip(-1), vh)


def test_unwritable_cache_only_warns(checkpoint, tmp_path):
    path, expected = checkpoint
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="could not write"):
        model = svftune.load_svf(tied_model(), path, cache_dir=blocker / "cache")
    assert rel_error(model(inputs()), expected) <= 1e-5
