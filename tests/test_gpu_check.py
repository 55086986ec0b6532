"""benchmarks/gpu_check.py end to end on the CPU (``--quick``), so the command a lent GPU runs cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ["exactness", "checkpoints", "decomposition", "training", "fss", "lora", "cuda_tests"]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    paths = [str(REPO / "src"), str(REPO / "examples" / "fss" / "src")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def _mini_source_or_skip() -> None:
    from svf_fss.data.errors import DataError
    from svf_fss.data.mini import load_fashion

    try:
        load_fashion()
    except DataError as e:
        if os.environ.get("CI"):  # .ci/setup.sh installs it: in CI a missing source is a failure
            raise
        pytest.skip(f"mini benchmark source missing: {e}")


@pytest.mark.slow
def test_quick_cpu_run_passes_every_section(tmp_path):
    _mini_source_or_skip()
    result = _run("--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["sections"]) == SECTIONS
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    assert report["total_seconds"] <= report["budget_s"] + 5
    for name, section in report["sections"].items():
        status = section["status"]
        if name == "cuda_tests":  # no CUDA: the tests are collected and skipped by the marker
            assert status.startswith("skipped: no CUDA"), status
        elif name == "lora" and status.startswith("skipped"):
            pytest.importorskip("peft")  # only a missing peft justifies it
            raise AssertionError(status)
        else:
            assert status == "passed", f"{name}: {status}\n{section.get('log_tail', '')[-2000:]}"
        assert section["checks"] and all(c["ok"] for c in section["checks"]), name
        assert not section["partial"] and not section["nonfinite_metrics"], name
        assert all(math.isfinite(v) for v in _numbers(section["metrics"])), name
    exact = report["sections"]["exactness"]["tables"][0]["rows"]
    assert {(row[0], row[1]) for row in exact} == {(m, p) for m in ("resnet18", "vit_block") for p in ("fp32", "bf16")}
    fss = report["sections"]["fss"]
    assert [row[0] for row in fss["tables"][0]["rows"]] == ["baseline", "pfenet", "bam"]
    assert all(fss["metrics"][m]["iterations"] == 3 for m in ("baseline", "pfenet", "bam"))
    training = report["sections"]["training"]["metrics"]["fp32.median_step_seconds"]
    assert set(training) == {"auto", "three_op", "rebuilt", "lean", "direct", "floor"}
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {name}: " in markdown for name in SECTIONS)
    assert (tmp_path / "gpu_check.log").stat().st_size > 0


@pytest.mark.slow
def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the mini dataset should be generated")
    result = _run("--out", str(tmp_path / "out"), "--sections", "checkpoints", "fss", "--mini-root", str(blocker))
    assert result.returncode == 1
    sections = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["sections"]
    assert sections["checkpoints"]["status"] == "passed"
    assert sections["fss"]["status"].startswith("failed: ")
    assert any("Error" in line for line in sections["fss"]["error"])


def test_sections_that_no_longer_fit_the_budget_are_skipped(tmp_path):
    result = _run("--out", str(tmp_path), "--budget-s", "1", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in report["sections"].values()] == ["skipped: budget"] * len(SECTIONS)
