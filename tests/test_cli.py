"""The svftune command line: inspect, merge, diff (table and PNG), --help, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import safetensors.torch
import torch
from fixtures.svf_models import LAYERS, inputs, rel_error, tied_model, trained

import svftune
from svftune.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = trained(tied_model())
    model[12].requires_grad_(False)
    svftune.save_svf(model, folder / "a.safetensors", metadata={"base_model": "tied-toy"})
    svftune.save_svf(trained(tied_model(), seed=4), folder / "b")
    base = {k: v.contiguous() for k, v in tied_model().state_dict().items()}
    safetensors.torch.save_file(base, folder / "base.safetensors")
    torch.save(base, folder / "base.pt")
    return {"folder": folder, "expected": model(inputs()).detach(), "merged_w": svftune.merge_svf(model).state_dict()}


@pytest.mark.parametrize("command", [[], ["inspect"], ["merge"], ["diff"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: svftune" in capsys.readouterr().out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "svftune.cli", "--help"], capture_output=True, text=True, check=True)
    assert "inspect" in result.stdout and "merge" in result.stdout and "diff" in result.stdout


def test_inspect(files, capsys):
    assert main(["inspect", str(files["folder"] / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "values:       101 singular values" in out and "layers:       7" in out
    assert "base_model:   tied-toy" in out and "size:" in out
    sha = svftune.read_svf(files["folder"] / "a.safetensors").layers["5"].sha256[:16]
    assert sha in out and "16b" in out  # the identity layer: one run of 16 with a stored basis


@pytest.mark.parametrize("base", ["base.safetensors", "base.pt"])
def test_merge_writes_plain_weights_of_the_fine_tuned_model(files, base, capsys):
    folder = files["folder"]
    out = folder / f"merged_{base}.safetensors"
    assert main(["merge", str(folder / base), str(folder / "a.safetensors"), str(out)]) == 0
    merged = safetensors.torch.load_file(out)
    model = tied_model()
    model.load_state_dict(merged)  # loads without svftune: a plain state dict with every key
    assert rel_error(model(inputs()), files["expected"]) <= 1e-5
    for name in LAYERS:
        assert torch.allclose(merged[f"{name}.weight"], files["merged_w"][f"{name}.weight"], rtol=0, atol=1e-6)


def test_merge_refuses_another_base(files, capsys):
    folder = files["folder"]
    other = {k: v.contiguous() for k, v in tied_model(seed=8).state_dict().items()}
    safetensors.torch.save_file(other, folder / "other.safetensors")
    code = main(
        ["merge", str(folder / "other.safetensors"), str(folder / "a.safetensors"), str(folder / "x.safetensors")]
    )
    assert code == 1 and "other base weights" in capsys.readouterr().err
    assert not (folder / "x.safetensors").exists()


def test_diff_table_and_two_checkpoints(files, capsys):
    folder = files["folder"]
    assert main(["diff", str(folder / "a.safetensors"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    checkpoint = svftune.read_svf(folder / "a.safetensors")
    delta = checkpoint.deltas["5"].reshape(-1)
    i = int(delta.abs().argmax())
    assert f"0:{i} {float(delta[i]):+.4g}" in out
    assert main(["diff", str(folder / "a.safetensors"), str(folder / "b")]) == 0
    assert "minus" in capsys.readouterr().out


def test_diff_png(files, capsys):
    pytest.importorskip("matplotlib")
    png = files["folder"] / "diff.png"
    assert main(["diff", str(files["folder"] / "a.safetensors"), "--png", str(png), "--layers", "5", "10"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_png_without_matplotlib_says_how_to_install(files, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["diff", str(files["folder"] / "a.safetensors"), "--png", str(files["folder"] / "n.png")])
    assert code == 1 and "pip install" in capsys.readouterr().err


def test_errors_are_one_line_not_tracebacks(files, capsys):
    assert main(["inspect", str(files["folder"] / "missing.safetensors")]) == 1
    assert "svftune inspect: error: no checkpoint at" in capsys.readouterr().err
    assert main(["diff", str(files["folder"] / "a.safetensors"), "--png", "x.png", "--layers", "nope"]) == 1
