"""The suite's CUDA-only tests (``@pytest.mark.cuda``), run with ``pytest -m cuda`` in a subprocess.

The test files are those under ``tests/`` and ``examples/fss/tests/`` that mention the marker (so collection does
not import the whole suite). Without CUDA the tests are collected and skipped by ``tests/conftest.py``: the
section then reports itself skipped, after checking that every test was skipped rather than failed.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

from .common import REPO, Context


def test_files() -> list[str]:
    roots = (REPO / "tests", REPO / "examples" / "fss" / "tests")
    files = [p for root in roots if root.is_dir() for p in sorted(root.rglob("test_*.py"))]
    return [str(p.relative_to(REPO)) for p in files if "mark.cuda" in p.read_text(errors="replace")]


def run(ctx: Context) -> None:
    report = ctx.report
    files = test_files()
    if not report.check("CUDA test files found", bool(files), files):
        return
    junit = ctx.scratch / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    try:
        result = subprocess.run(
            command + files, cwd=REPO, capture_output=True, text=True, timeout=max(ctx.left(), 5), check=False
        )
    except subprocess.TimeoutExpired:
        report.check("pytest -m cuda finished in the section's time", False, None, round(ctx.left()))
        return
    tail = (result.stdout + result.stderr)[-3000:]
    print(tail)
    suite = ET.parse(junit).getroot() if junit.is_file() else None
    if suite is not None and suite.tag == "testsuites":
        suite = suite[0]
    counts = {k: int(suite.get(k, 0)) if suite is not None else 0 for k in ("tests", "failures", "errors", "skipped")}
    report.metric("pytest", {**counts, "returncode": result.returncode, "seconds": float(suite.get("time", 0) or 0)})
    failed = [
        case.get("classname", "") + "::" + case.get("name", "")
        for case in (suite.iter("testcase") if suite is not None else [])
        if case.find("failure") is not None or case.find("error") is not None
    ]
    if ctx.cuda:
        ok = result.returncode == 0 and counts["tests"] > 0 and counts["skipped"] == 0
        report.check("pytest -m cuda: every CUDA test passed", ok, counts, None, "; ".join(failed[:5]) or tail[-800:])
    else:
        ok = counts["tests"] > 0 and counts["skipped"] == counts["tests"] and result.returncode == 0
        report.check(
            "without CUDA every cuda test is collected and skipped", ok, counts, None, tail[-800:] if not ok else ""
        )
        report.skip(f"no CUDA: the {counts['tests']} cuda tests were collected and skipped by the marker")
