"""The svf-fss command line as a user meets it: help on every option, where outputs go, config keys, and one-line
errors for runs that were never trained."""

from __future__ import annotations

import argparse

import pytest
from svf_fss.cli import build_parser, main
from svf_fss.train.config import FIELDS


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("svf-fss has no subcommands")


def test_every_option_of_every_subcommand_has_help_text():
    commands = subparsers(build_parser())
    assert {"train", "test", "show-config", "build-lists", "episodes", "figures"} <= set(commands)
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, parser in commands.items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert not missing, f"options without help text: {missing}"


def test_train_help_says_where_outputs_go_and_how_to_list_config_keys(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse re-wraps: compare with single spaces
    assert "runs/{dataset}/{backbone}/{method}-{strategy}/{shots}shot/fold{fold}" in text
    assert "'output'" in text and "last.pt" in text and "config.json" in text
    assert "svf-fss show-config" in text


def test_show_config_prints_every_key_resolved(capsys, tmp_path):
    config = tmp_path / "row.toml"
    config.write_text('method = "pfenet"\ndilation = "torchvision"\n')
    assert main(["show-config", str(config), "--set", "lr=0.5", "--fold", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = {line.lstrip("# ").split(" = ")[0] for line in lines if " = " in line}
    assert keys == set(FIELDS)
    assert 'method = "pfenet"' in lines and 'dilation = "torchvision"' in lines
    assert "lr = 0.5" in lines and "fold = 2" in lines and 'kshot = "mean"' in lines
    assert lines[-1] == "# run folder: runs/pascal/resnet50_v2/pfenet-svf/1shot/fold2"


def test_test_without_a_trained_run_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "never-trained"
    assert main(["test", "--set", f"output={out}", "--set", "device=cpu", "--checkpoint", "last"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err
    assert err.startswith("svf-fss test: error: no last checkpoint at") and str(out / "last.pt") in err
    assert "svf-fss train" in err
    assert not out.exists()  # nothing was created for a run that does not exist


def test_config_errors_are_one_line_too(capsys):
    assert main(["show-config", "--set", "dilation=deeplab"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "svf-fss show-config: error: dilation must be pspnet or torchvision"
    assert main(["show-config", "--set", "method=pfenet", "--set", "kshot=sum"]) == 2
    assert "kshot=sum is the baseline's option only" in capsys.readouterr().err
