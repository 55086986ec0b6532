"""The svftune command line: inspect, merge, diff (table and PNG), --help, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import safetensors.torch
import torch
from fixtures.svf_files import meta_of, with_meta
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
    assert code == 2 and "other base weights" in capsys.readouterr().err
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
    assert code == 2 and "pip install" in capsys.readouterr().err


def test_errors_are_one_line_not_tracebacks(files, capsys):
    assert main(["inspect", str(files["folder"] / "missing.safetensors")]) == 2
    assert "svftune inspect: error: no checkpoint at" in capsys.readouterr().err
    assert main(["diff", str(files["folder"] / "a.safetensors"), "--png", "x.png", "--layers", "nope"]) == 2
    assert "\n" not in capsys.readouterr().err.strip()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"svftune {svftune.__version__}"


def test_top_level_help_lists_every_subcommand_without_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("inspect", "merge", "diff", "plot-changes", "plot-activations"):
        assert f"\n    {command}" in out
    assert "``" not in out and ":func:" not in out


@pytest.mark.parametrize(
    "argv",
    [["inspect"], ["diff", "x", "--top", "many"], ["nope"], ["merge", "a"], ["inspect", "a", "--bogus"]],
    ids=["missing-arg", "bad-int", "unknown-command", "too-few", "unknown-option"],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "error:" in err and "Traceback" not in err


def _hostile(folder):
    data = (folder / "a.safetensors").read_bytes()
    deep = folder / "deep.safetensors"
    deep.write_bytes(with_meta(data, None, text="[" * 3000 + "]" * 3000))
    huge = folder / "huge.safetensors"
    huge.write_bytes(
        with_meta(data, None, text='{"format": "svftune.svf_checkpoint", "format_version": ' + "9" * 5000 + "}")
    )
    wrong = folder / "wrong.safetensors"
    meta = meta_of(data)
    meta["layers"]["0"]["dtype"] = ["float32"]
    wrong.write_bytes(with_meta(data, meta))
    length = folder / "length.safetensors"
    length.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    return [deep, huge, wrong, length]


@pytest.mark.parametrize("command", ["inspect", "diff"])
def test_hostile_files_give_one_line_not_a_traceback(files, capsys, command):
    for path in _hostile(files["folder"]):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"svftune {command}: error: ") and "\n" not in err, err


def test_inspect_and_diff_without_svftune_version(files, capsys):
    data = (files["folder"] / "a.safetensors").read_bytes()
    meta = meta_of(data)
    del meta["svftune_version"]
    path = files["folder"] / "noversion.safetensors"
    path.write_bytes(with_meta(data, meta))
    assert main(["inspect", str(path)]) == 0
    assert "(svftune unknown)" in capsys.readouterr().out
    assert main(["diff", str(path)]) == 0


def test_closed_pipe_exits_quietly(files):
    command = f"{sys.executable} -m svftune.cli inspect --all {files['folder'] / 'a.safetensors'} | head -n 1"
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("checkpoint:") and result.stderr == ""


def test_model_spec_keyword_arguments():
    from svftune.cli import build_model, parse_model_spec

    assert parse_model_spec("torch.nn:Linear(in_features=3, out_features=2, bias=False)") == (
        "torch.nn",
        "Linear",
        {"in_features": 3, "out_features": 2, "bias": False},
    )
    assert parse_model_spec("m:f", ["n=10", "name=resnet", "xs=[1, 2]"])[2] == {"n": 10, "name": "resnet", "xs": [1, 2]}
    model = build_model("torch.nn:Linear", ["in_features=3", "out_features=2"])
    assert tuple(model.weight.shape) == (2, 3)
    for bad in ("torch.nn:Linear(__import__('os').system('true'))", "torch.nn:Linear(x=open('f'))", "nomodule"):
        with pytest.raises(svftune.plots.PlotError):
            parse_model_spec(bad)
    with pytest.raises(svftune.plots.PlotError, match="failed"):
        build_model("torch.nn:Linear(in_features=3)")


def test_plot_activations_takes_the_checkpoint_positionally(files, capsys):
    """The checkpoint is the first argument like everywhere else; --checkpoint still works, with a warning."""
    folder = files["folder"]
    common = ["--model", "fixtures.svf_models:tied_model", "--layer", "5", "--image", str(folder / "none.png")]
    common += ["--out", str(folder / "o.png")]
    assert main(["plot-activations", str(folder / "a.safetensors"), *common]) == 2
    assert "--image" in capsys.readouterr().err  # got past the argument parsing to the missing image
    assert main(["plot-activations", "--checkpoint", str(folder / "a.safetensors"), *common]) == 2
    assert "deprecated" in capsys.readouterr().err
    assert main(["plot-activations", *common]) == 2
    assert "give the checkpoint" in capsys.readouterr().err
