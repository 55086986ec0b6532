"""Collect finished runs into the paper's table layout, next to the paper's numbers."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

# SVF paper Tables 1-2, mIoU mean of 4 folds, dataset trick on: (dataset, method, svf, backbone, shots) -> value.
_PAPER_ROWS = {
    ("pascal", "baseline"): ((60.15, 65.44, 65.07, 69.41), (62.89, 68.34, 67.14, 71.42)),
    ("pascal", "pfenet"): ((63.35, 69.36, 66.35, 71.20), (64.33, 69.80, 68.15, 71.82)),
    ("pascal", "bam"): ((64.41, 68.76, 67.81, 70.91), (64.87, 69.11, 68.95, 72.28)),
    ("coco", "baseline"): ((37.43, 45.81, 41.84, 51.93), (38.26, 47.16, 43.72, 52.89)),
    ("coco", "pfenet"): ((41.97, 48.36, 46.05, 54.17), (42.24, 49.49, 48.02, 54.38)),
    ("coco", "bam"): ((43.50, 49.34, 46.23, 51.16), (43.76, 49.07, 48.47, 53.87)),
}
PAPER: dict[tuple[str, str, bool, str, int], float] = {}
for (_dataset, _method), _rows in _PAPER_ROWS.items():
    for _svf, _values in zip((False, True), _rows, strict=True):
        _keys = [("vgg16_bn", 1), ("vgg16_bn", 5), ("resnet50_v2", 1), ("resnet50_v2", 5)]
        for (_backbone, _shots), _value in zip(_keys, _values, strict=True):
            PAPER[(_dataset, _method, _svf, _backbone, _shots)] = _value


def collect_runs(root: str | Path, which: str = "best") -> list[dict[str, Any]]:
    """Every run folder under ``root`` with a ``config.json`` and a ``test_{which}.json``."""
    runs = []
    for config_path in sorted(Path(root).rglob("config.json")):
        result_path = config_path.parent / f"test_{which}.json"
        if not result_path.exists():
            continue
        config = json.loads(config_path.read_text())
        result = json.loads(result_path.read_text())
        runs.append({"config": config, "result": result, "path": str(config_path.parent)})
    return runs


def _row_name(config: dict[str, Any]) -> str:
    dagger = "†" if config.get("trick", True) else ""
    strategy = config["strategy"]
    suffix = "" if strategy == "frozen" else "+SVF" if strategy == "svf" else f"+{strategy}"
    if config.get("kshot") == "sum":  # the SVF release's K-shot rule: its own row next to the mean-rule run
        suffix += " (K-shot sum)"
    return f"{config['method']}{dagger}{suffix}"


def markdown_table(runs: list[dict[str, Any]], which: str = "best") -> str:
    """One table per (dataset, backbone, shots): rows are method/strategy, columns folds 0-3, mean, delta vs the
    frozen row of the same method, and the paper's mean where it has one. mIoU in percent."""
    groups: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    meta: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for run in runs:
        c = run["config"]
        key = (c["dataset"], c["backbone"], c["shots"])
        name = _row_name(c)
        groups[key][name][c["fold"]] = 100.0 * run["result"]["miou"]
        meta[key][name] = c
    lines = []
    for key in sorted(groups):
        dataset, backbone, shots = key
        lines.append(f"### {dataset}, {backbone}, {shots}-shot (mIoU %, checkpoint: {which})\n")
        lines.append("| method | fold0 | fold1 | fold2 | fold3 | mean | Δ vs frozen | paper mean |")
        lines.append("|---|---|---|---|---|---|---|---|")
        rows = groups[key]
        means = {name: sum(f.values()) / len(f) if len(f) == 4 else None for name, f in rows.items()}
        for name in sorted(rows):
            folds = rows[name]
            cells = [f"{folds[i]:.2f}" if i in folds else "–" for i in range(4)]
            mean = means[name]
            c = meta[key][name]
            frozen_name = _row_name({**c, "strategy": "frozen"})
            delta = ""
            if mean is not None and means.get(frozen_name) is not None and name != frozen_name:
                delta = f"{mean - means[frozen_name]:+.2f}"
            paper = PAPER.get((dataset, c["method"], c["strategy"] == "svf", backbone, shots))
            mean_cell = f"{mean:.2f}" if mean is not None else "–"
            paper_cell = f"{paper:.2f}" if paper is not None and c.get("trick", True) else ""
            lines.append(f"| {name} | {' | '.join(cells)} | {mean_cell} | {delta} | {paper_cell} |")
        lines.append("")
    return "\n".join(lines) if lines else "no finished runs found (a run is finished once `svf-fss test` wrote it)\n"
