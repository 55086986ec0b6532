"""save_svf / load_svf: exact reproduction (ties included), base checks, damaged files, atomic writes."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from fixtures.svf_models import LAYERS, inputs, rel_error, rotating_svd, tied_model, trained
from torch import nn

import svftune
import svftune.layers
from svftune.checkpoint import CONFIG_NAME, SVFCheckpointError
from svftune.fingerprint import weight_sha256

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained tied model, its outputs, and its checkpoint as a file and as a directory."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = trained(tied_model())
    expected = model(inputs()).detach()
    file, directory = folder / "svf.safetensors", folder / "svf_dir"
    svftune.save_svf(model, file, metadata={"base_model": "tied-toy", "metrics": {"acc": 0.5}})
    svftune.save_svf(model, directory)
    return {"model": model, "expected": expected, "file": file, "dir": directory}


def snapshot(model: nn.Module) -> dict:
    """Everything load_svf could change: module types, tensors, requires_grad, train flags, attributes."""
    return {
        "types": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": sorted(k for k in model.__dict__ if k.startswith("svf")),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"] and after["grad"] == before["grad"] and after["attrs"] == before["attrs"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("form", ["file", "dir"])
def test_round_trip_reproduces_outputs(saved, form):
    """A plain base + the checkpoint gives the trained model's outputs and configuration."""
    model = svftune.load_svf(tied_model(), saved[form])
    assert rel_error(model(inputs()), saved["expected"]) <= 1e-5
    assert [n for n, _ in svftune.svf_layers(model)] == LAYERS
    assert model.svf_config.train == "S" and svftune.trainable_parameters(model)[0] == sum(
        layer.S.numel() for _, layer in svftune.svf_layers(model)
    )


def test_ties_are_recorded_and_bases_stored_only_where_needed(saved):
    """Unequal changes in tied runs store the run's basis; zero runs need it even for equal changes."""
    checkpoint = svftune.read_svf(saved["file"])
    actions = {name: [tuple(t) for t in entry.ties] for name, entry in checkpoint.layers.items()}
    assert actions["1"] == [(0, 6, 12, "basis")]  # duplicate filters: six zero singular values
    assert actions["3"] == [(0, 8, 12, "basis")]  # zero-padded channels
    assert actions["5"] == [(0, 0, 16, "basis")]  # identity: one run of 16
    assert len(actions["10"]) == 16 and actions["0"] == [] and actions["12"] == []
    assert checkpoint.bases["5"][0][3].shape == (16, 16)

    model = tied_model()
    svftune.apply_svf(model, layers=LAYERS)
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            layer.S.add_(0.25)  # equal changes everywhere
    path = saved["file"].parent / "equal.safetensors"
    svftune.save_svf(model, path)
    ties = {name: entry.ties for name, entry in svftune.read_svf(path).layers.items()}
    assert ties["5"] == [[0, 0, 16, "equal"]]  # non-zero run, equal change: basis-free
    assert ties["1"] == [[0, 6, 12, "basis"]]  # zero run: its left/right pairing is arbitrary
    assert not any(key.startswith(("tie_U/5", "tie_U/10")) for key in safetensors.torch.load_file(path))


@pytest.mark.parametrize("seed", [0, 1])
def test_other_valid_decomposition_still_reproduces(saved, monkeypatch, seed):
    """Another LAPACK (random signs, rotated tied runs) must not change the loaded model; without the stored
    bases it would (the control shows the test has teeth)."""
    monkeypatch.setattr(svftune.layers, "thin_svd", rotating_svd(seed))
    model = svftune.load_svf(tied_model(), saved["file"])
    assert rel_error(model(inputs()), saved["expected"]) <= 1e-5
    for _, layer in svftune.svf_layers(model):  # the paper's three-op training form (U diag(S) Vh, no W) too
        layer.form = "three_op"
    assert rel_error(model.train()(inputs()), saved["expected"]) <= 1e-5

    naive = tied_model()
    svftune.apply_svf(naive, layers=LAYERS)
    checkpoint = svftune.read_svf(saved["file"])
    with torch.no_grad():
        for name, layer in svftune.svf_layers(naive):
            layer.S.copy_(layer.S0 + checkpoint.deltas[name])
    assert rel_error(naive(inputs()), saved["expected"]) > 1e-2


def test_base_resaved_as_float64_is_recognised_and_reproduces(saved):
    model = tied_model(dtype=torch.float64)
    plan = svftune.checkpoint.check_model(model, svftune.read_svf(saved["file"]))
    assert set(plan.match.values()) == {"same values"}
    svftune.load_svf(model, saved["file"])
    assert rel_error(model(inputs(torch.float64)), saved["expected"]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_base_rounded_to_half_is_recognised_with_a_warning(saved, dtype):
    model = tied_model().to(dtype).float()  # same weights, rounded as a half-precision copy would be
    with pytest.warns(UserWarning, match="not bit-identical"):
        svftune.load_svf(model, saved["file"])
    assert rel_error(model(inputs()), saved["expected"]) <= 5e-2


def test_another_process_seed_and_thread_count_reproduce(saved, tmp_path):
    """Decompose in a fresh process with another RNG state and thread count."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from fixtures.svf_models import tied_model, inputs
        import svftune
        model = tied_model()
        torch.manual_seed(1234)
        torch.set_num_threads(1)
        svftune.load_svf(model, {str(saved["dir"])!r})
        torch.save(model(inputs()).detach(), {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert rel_error(out, saved["expected"]) <= 1e-5


@pytest.mark.parametrize("train", ["US", "V"])
def test_u_v_training_round_trip(tmp_path, monkeypatch, train):
    """Table 7 ablations store the trained bases whole; another valid SVD on load changes nothing."""
    model = trained(tied_model(), train=train)
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            factor = layer.U if "U" in train else layer.Vh
            factor.add_(0.01 * torch.randn_like(factor))
    expected = model(inputs())
    svftune.save_svf(model, tmp_path / "c.safetensors")
    monkeypatch.setattr(svftune.layers, "thin_svd", rotating_svd(5))
    loaded = svftune.load_svf(tied_model(), tmp_path / "c.safetensors")
    assert loaded.svf_config.train == train
    assert rel_error(loaded(inputs()), expected) <= 1e-5


def test_other_trained_parameters_travel_and_stay_trainable(tmp_path):
    model = trained(tied_model(), layers=LAYERS[:-1])
    model[12].requires_grad_(True)
    with torch.no_grad():
        model[12].weight.mul_(-3)
    expected = model(inputs()).detach()
    svftune.save_svf(model, tmp_path / "c.safetensors")
    loaded = svftune.load_svf(tied_model(), tmp_path / "c.safetensors")
    assert rel_error(loaded(inputs()), expected) <= 1e-5
    assert loaded[12].weight.requires_grad and not loaded[0].base_weight.requires_grad


def test_float16_storage_is_smaller_and_close(saved, tmp_path):
    half = tmp_path / "half.safetensors"
    svftune.save_svf(saved["model"], half, dtype=torch.float16)
    assert half.stat().st_size < saved["file"].stat().st_size
    model = svftune.load_svf(tied_model(), half)
    assert rel_error(model(inputs()), saved["expected"]) <= 5e-3


def test_already_adapted_model_is_accepted_when_it_matches(saved):
    model = tied_model()
    svftune.apply_svf(model, layers=LAYERS)
    svftune.load_svf(model, saved["file"])
    assert rel_error(model(inputs()), saved["expected"]) <= 1e-5


def test_already_adapted_model_that_differs_is_refused(saved):
    model = tied_model()
    svftune.apply_svf(model, layers=LAYERS[:-1])
    before = snapshot(model)
    with pytest.raises(SVFCheckpointError, match="12: is not adapted in the model"):
        svftune.load_svf(model, saved["file"])
    assert_unchanged(model, before)
    other = tied_model()
    svftune.apply_svf(other, layers=LAYERS, train="US")
    with pytest.raises(SVFCheckpointError, match="train="):
        svftune.load_svf(other, saved["file"])


def test_device_argument_moves_the_model(saved):
    model = svftune.load_svf(tied_model(), saved["file"], device="cpu")
    assert rel_error(model(inputs()), saved["expected"]) <= 1e-5


# ------------------------------------------------------------------------------------------ other bases
def test_other_weights_name_the_layers_and_leave_the_model_unchanged(saved):
    model = tied_model(seed=3)
    before = snapshot(model)
    with pytest.raises(SVFCheckpointError) as info:
        svftune.load_svf(model, saved["file"])
    message = str(info.value)
    assert "  0: other base weights" in message and "sha256" in message and "strict=False" in message
    assert_unchanged(model, before)


def test_strict_false_loads_the_matching_layers_and_warns(saved):
    model = tied_model()
    with torch.no_grad():
        model[0].weight.add_(0.5)  # a deliberately changed (e.g. fine-tuned) layer
    with pytest.warns(UserWarning, match="0: other base weights"):
        svftune.load_svf(model, saved["file"], strict=False)
    assert [n for n, _ in svftune.svf_layers(model)] == LAYERS[1:]
    before = snapshot(model)
    with pytest.raises(SVFCheckpointError, match="0: is not adapted in the model"):
        svftune.load_svf(model, saved["file"])  # strict again, now onto the adapted model: still refused
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: setattr(m, "5", nn.Identity()), "5: is a Identity in the model"),
        (lambda m: setattr(m, "3", nn.Conv2d(12, 16, 3)), "3: weight shape 16x12x3x3"),
        (lambda m: setattr(m, "10", nn.Conv1d(64, 32, 1)), "10: is a Conv1d in the model"),
        (lambda m: delattr(m, "12"), "12: missing from the model"),
    ],
    ids=["other-architecture", "other-shape", "other-kind", "missing"],
)
def test_structural_differences_are_named(saved, change, expected):
    model = tied_model()
    change(model)
    before = snapshot(model)
    with pytest.raises(SVFCheckpointError, match=expected.replace("(", r"\(")):
        svftune.load_svf(model, saved["file"])
    assert_unchanged(model, before)


def test_another_model_entirely(saved):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(SVFCheckpointError, match="No layer matches"):
        svftune.load_svf(model, saved["file"], strict=False)


# ------------------------------------------------------------------------------------------ damaged files
def _rewrite_metadata(path: Path, edit) -> None:
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    tensors = safetensors.torch.load(data)
    meta = json.loads(header["svftune"])
    edit(meta, tensors)
    if "digests" in meta:  # format 2: an editor that also rewrites the digests, so the later checks are reached
        meta["digests"] = {key: weight_sha256(value) for key, value in tensors.items()}
    safetensors.torch.save_file(tensors, path, metadata={"format": header["format"], "svftune": json.dumps(meta)})


DAMAGE = {
    "empty": (lambda p: p.write_bytes(b""), "empty or truncated"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    "truncated-header": (lambda p: p.write_bytes(p.read_bytes()[:50]), "truncated"),
    "garbage": (lambda p: p.write_bytes(os.urandom(3000)), "not a safetensors file"),
    "pickle": (lambda p: torch.save({"a": torch.ones(2)}, p), "not a safetensors file"),
    "foreign": (lambda p: safetensors.torch.save_file({"w": torch.ones(2)}, p), "not an svftune checkpoint"),
    "future-version": (
        lambda p: _rewrite_metadata(p, lambda m, t: m.update(format_version=99)),
        "format 99.*upgrade svftune",
    ),
    "nan": (lambda p: _rewrite_metadata(p, lambda m, t: t["delta_S"].__setitem__(3, float("nan"))), "NaN or Inf"),
    "inf": (lambda p: _rewrite_metadata(p, lambda m, t: t["delta_S"].__setitem__(0, float("inf"))), "NaN or Inf"),
    "bad-field": (lambda p: _rewrite_metadata(p, lambda m, t: m["layers"]["5"].update(rank="16")), "rank"),
    "bad-ties": (
        lambda p: _rewrite_metadata(p, lambda m, t: m["layers"]["1"].update(ties=[[0, 6, 99, "basis"]])),
        "ties",
    ),
    "missing-tensor": (lambda p: _rewrite_metadata(p, lambda m, t: t.pop("tie_U/5")), "missing tie_U/5"),
    "extra-tensor": (lambda p: _rewrite_metadata(p, lambda m, t: t.update(x=torch.ones(1))), "unexpected x"),
    "wrong-length": (lambda p: _rewrite_metadata(p, lambda m, t: t.update(delta_S=t["delta_S"][:-1])), "shape"),
    "not-json": (
        lambda p: safetensors.torch.save_file(
            safetensors.torch.load_file(p), p, metadata={"format": "svftune.svf_checkpoint", "svftune": "{"}
        ),
        "not valid JSON",
    ),
    "bad-train": (lambda p: _rewrite_metadata(p, lambda m, t: m["config"].update(train="X")), "config.train"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_file_raises_one_error_and_leaves_the_model(saved, tmp_path, damage):
    path = tmp_path / "c.safetensors"
    path.write_bytes(saved["file"].read_bytes())
    spoil, expected = DAMAGE[damage]
    spoil(path)
    model = tied_model()
    before = snapshot(model)
    with pytest.raises(SVFCheckpointError, match=expected):
        svftune.load_svf(model, path)
    assert_unchanged(model, before)


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / CONFIG_NAME).read_text())
    edit(config)
    (directory / CONFIG_NAME).write_text(json.dumps(config))


DIR_DAMAGE = {
    "no-config": (lambda d: (d / CONFIG_NAME).unlink(), "holds no svf_config.json"),
    "weights-changed": (
        lambda d: next(d.glob("svf_model-*")).write_bytes(next(d.glob("svf_model-*")).read_bytes()[:-4] + b"\0\0\0\1"),
        "sha256 differs",
    ),
    "weights-missing": (lambda d: next(d.glob("svf_model-*")).unlink(), "which is missing"),
    "path-escape": (lambda d: _edit_config(d, lambda c: c.update(weights="../x.safetensors")), "must name a file"),
    "config-edited": (lambda d: _edit_config(d, lambda c: c["layers"]["0"].update(sha256="zz")), "sha256"),
}


@pytest.mark.parametrize("damage", list(DIR_DAMAGE))
def test_damaged_directory_raises(saved, tmp_path, damage):
    directory = tmp_path / "d"
    directory.mkdir()
    for file in saved["dir"].iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    spoil, expected = DIR_DAMAGE[damage]
    spoil(directory)
    model = tied_model()
    before = snapshot(model)
    with pytest.raises(SVFCheckpointError, match=expected):
        svftune.load_svf(model, directory)
    assert_unchanged(model, before)


def test_weights_file_of_a_directory_points_to_the_directory(saved):
    with pytest.raises(SVFCheckpointError, match="load the directory"):
        svftune.read_svf(next(saved["dir"].glob("svf_model-*")))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SVFCheckpointError, match="no checkpoint at"):
        svftune.read_svf(tmp_path / "nothing.safetensors")


def test_load_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the load path unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for source in (saved["file"], saved["dir"]):
        svftune.load_svf(tied_model(), source)


def test_error_during_apply_rolls_back(saved, monkeypatch):
    """An unexpected failure half-way through building the layers leaves the model as it was."""
    calls = []

    def failing(matrices):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return svftune.decompose.thin_svd(matrices)

    monkeypatch.setattr(svftune.layers, "thin_svd", failing)
    model = tied_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="simulated"):
        svftune.load_svf(model, saved["file"])
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------ writes
def test_full_disk_keeps_the_old_file(saved, tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    path.write_bytes(saved["file"].read_bytes())
    old = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    model = trained(tied_model(), seed=9)
    with pytest.raises(OSError, match="No space"):
        svftune.save_svf(model, path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize("form", ["c.safetensors", "c_dir"])
def test_crash_during_save_keeps_the_old_checkpoint(saved, tmp_path, form):
    """A process killed at the moment of the final rename leaves the previous checkpoint loadable."""
    target = tmp_path / form
    svftune.save_svf(saved["model"], target)
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from fixtures.svf_models import tied_model, trained
        import svftune
        model = trained(tied_model(), seed=9)
        real = os.replace
        def crash(src, dst):
            if str(dst).endswith({"svf_config.json" if form == "c_dir" else "c.safetensors"!r}):
                os._exit(3)
            real(src, dst)
        os.replace = crash
        svftune.save_svf(model, {str(target)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=300)
    assert result.returncode == 3
    model = svftune.load_svf(tied_model(), target)
    assert rel_error(model(inputs()), saved["expected"]) <= 1e-5


def test_directory_form_contents(saved):
    names = sorted(p.name for p in saved["dir"].iterdir())
    assert names[:2] == ["README.md", CONFIG_NAME] and names[2].startswith("svf_model-") and len(names) == 3
    card = (saved["file"].parent / "card").with_suffix("")
    svftune.save_svf(saved["model"], card, metadata={"base_model": "tied-toy", "metrics": {"acc": 0.5}})
    text = (card / "README.md").read_text()
    assert "base_model: tied-toy" in text and "| acc | 0.5 |" in text and "Trainable singular values: 101" in text


def test_save_refuses_bad_input(tmp_path):
    with pytest.raises(SVFCheckpointError, match="apply_svf"):
        svftune.save_svf(tied_model(), tmp_path / "c.safetensors")
    model = trained(tied_model())
    with pytest.raises(SVFCheckpointError, match="JSON-able"):
        svftune.save_svf(model, tmp_path / "c.safetensors", metadata={"x": object()})
    with torch.no_grad():
        svftune.svf_layers(model)[0][1].S[0, 0] = float("nan")
    with pytest.raises(SVFCheckpointError, match="NaN"):
        svftune.save_svf(model, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decomposition_on_cuda_reproduces_cpu_training(saved):
    """cuSOLVER instead of LAPACK (another valid SVD); TF32 off so the comparison sees only the checkpoint."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = svftune.load_svf(tied_model().cuda(), saved["file"])
    assert rel_error(model(inputs().cuda()).cpu(), saved["expected"]) <= 1e-5
    svftune.set_adapter(model, "default")
