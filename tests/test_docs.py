"""The documentation site builds without warnings, and the examples in its pages run.

- ``mkdocs build --strict`` into a temporary directory (skipped when mkdocs is not installed: ``pip install -e
  ".[docs]"``).
- Every ```` ```python ```` block of the quickstart and how-to pages is executed. The runnable blocks of one page
  run top to bottom in one fresh namespace, in a temporary working directory, so a page is self-contained but
  its blocks may build on each other. A block preceded by ``<!-- not-run: reason -->`` (Hub access, torchrun) is
  only compiled, not run. Downloads of pretrained weights are refused, so an example that asks for them fails here
  instead of reaching the network.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Pages whose examples are executed: the quickstart and the how-to guides.
EXECUTED_PAGES = ["index.md", *sorted(str(p.relative_to(DOCS)) for p in (DOCS / "howto").glob("*.md"))]
FENCE = re.compile(r"^```python\s*$\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int
    code: str
    skip_reason: str | None


def code_blocks(page: str, root: Path = DOCS) -> list[Block]:
    """The page's ```python blocks with their first line number and not-run reason (if any)."""
    text = (root / page).read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        previous = before[-1] if before else ""
        marker = NOT_RUN.search(previous)
        reason = marker.group(1) if marker else None
        if marker and not reason:
            raise AssertionError(f"{page}: a not-run marker needs a reason: <!-- not-run: why -->")
        line = text.count("\n", 0, match.start(1)) + 1
        blocks.append(Block(page, line, match.group(1), reason))
    return blocks


def test_executed_pages_exist_and_have_examples():
    assert "howto/select-layers.md" in EXECUTED_PAGES
    assert [b.skip_reason is not None for b in code_blocks("howto/ddp.md")] == [False, True]
    assert all(b.skip_reason is None for b in code_blocks("howto/timm.md")), "timm (dev extra) examples run"
    for page in EXECUTED_PAGES:
        blocks = code_blocks(page)
        assert any(b.skip_reason is None for b in blocks), f"{page} has no runnable python example"


def run_blocks(blocks: list[Block], label: str, tmp_path: Path, monkeypatch, transform=lambda code: code) -> None:
    """Run the runnable blocks in order in one fresh namespace, offline, in ``tmp_path`` (``transform`` edits the
    code of each block first); not-run blocks are only compiled."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"a documentation example asked to download {url}; examples must run offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small examples: one thread is faster on a busy 2-core machine
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{Path(label).stem.replace('-', '_')}"}
    try:
        for block in blocks:
            code = compile(transform(block.code), f"{label}:{block.line}", "exec")  # not-run blocks must still parse
            if block.skip_reason is None:
                exec(code, namespace)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    run_blocks(code_blocks(page), f"docs/{page}", tmp_path, monkeypatch)


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip('mkdocs is not installed: pip install -e ".[docs]"')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "svftune" / "index.html").is_file()
