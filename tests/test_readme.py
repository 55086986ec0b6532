"""Every ```python block of README.md runs, top to bottom in one namespace, as one story ("Use", "Share", merge).

Runs offline with the machinery of test_docs.py (blocks marked ``<!-- not-run: reason -->`` are only compiled).
One documented substitution: pretrained weights are not downloaded, so every ``torchvision.models.NAME(weights="...")``
call becomes ``(torch.manual_seed(0), torchvision.models.NAME(weights=None))[1]``: random weights of the same
architecture, the same ones at every call (as the same pretrained weights would be). Nothing else is changed.
"""

from __future__ import annotations

import re

import pytest
from test_docs import ROOT, code_blocks, run_blocks

PRETRAINED = re.compile(r"""torchvision\.models\.(\w+)\(weights=(?:"[^"]*"|'[^']*')\)""")


def offline(code: str) -> str:
    """The README code with seeded random instead of pretrained weights."""
    return PRETRAINED.sub(r"(__import__('torch').manual_seed(0), torchvision.models.\1(weights=None))[1]", code)


def test_readme_has_the_story_blocks():
    blocks = code_blocks("README.md", root=ROOT)
    runnable = [b for b in blocks if b.skip_reason is None]
    assert len(runnable) >= 3
    assert "import torch\n" in runnable[0].code, "the Use block imports what it uses"
    replaced = offline('m = torchvision.models.resnet50(weights="IMAGENET1K_V2")')
    assert replaced == "m = (__import__('torch').manual_seed(0), torchvision.models.resnet50(weights=None))[1]"


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    run_blocks(code_blocks("README.md", root=ROOT), "README.md", tmp_path, monkeypatch, transform=offline)
    assert "trainable params: 12,544 || all params: 25,569,576" in capsys.readouterr().out
