"""The svf-fss CLI data subcommands, and clean errors (exit 2, no traceback) for missing data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from svf_fss.cli import main
from svf_fss.data import EpisodeTable

pytestmark = pytest.mark.usefixtures("single_thread")


def test_build_lists_prints_and_writes_fold_lists(mini_root, tmp_path, capsys):
    assert main(["build-lists", "--root", str(mini_root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert set(counts) == {"train", "train_notrick", "val"}
    assert f"fold0={counts['train']['0']}" in out
    lines = (tmp_path / "val_fold2.txt").read_text().splitlines()
    assert len(lines) == counts["val"]["2"] and lines[0].startswith("JPEGImages/val_")
    classes = json.loads((tmp_path / "train_fold1_notrick_classes.json").read_text())
    assert sorted(int(c) for c in classes) == [c for c in range(1, 21) if c not in range(6, 11)]


def test_episodes_command_writes_bam_seed_tables(mini_root, tmp_path):
    pattern = str(tmp_path / "f{fold}_{shots}shot_seed{seed}.json")
    args = ["episodes", "--root", str(mini_root), "--fold", "1", "--shots", "5", "--num", "30", "--out", pattern]
    assert main([*args, "--bam-seeds"]) == 0
    tables = sorted(tmp_path.glob("f1_5shot_seed*.json"))
    assert [int(p.stem.split("seed")[1]) for p in tables] == sorted([510, 365, 382, 322, 988])
    t = EpisodeTable.load(tables[0])
    assert len(t) == 30 and t.shots == 5 and t.fold == 1


def test_missing_data_exits_2_with_a_download_hint(tmp_path, capsys):
    assert main(["build-lists", "--root", str(tmp_path / "VOC2012")]) == 2
    err = capsys.readouterr().err
    assert "data root does not exist" in err and "SegmentationClassAug" in err and "Traceback" not in err
    assert main(["build-lists", "--dataset", "coco", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lists/train.txt" in err and "svf-fss coco-labels" in err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("svf-fss")
    assert exe.exists(), "svf-fss console script missing: pip install -e 'examples/fss[mini]'"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for cmd in ("make-mini", "voc-lists", "coco-labels", "build-lists", "episodes"):
        assert cmd in res.stdout
