"""The offline mini benchmark: frozen vs SVF vs full fine-tuning of a real ImageNet MobileNetV2, on a laptop CPU.

One command generates the mini dataset (Pascal layout, 20 classes) if needed, trains the baseline method on fold 0,
1-shot, once per backbone strategy with the same seed, schedule and episodes, evaluates each on the same test
episode table, prints the comparison, and writes ``results.json``, ``results.md``, ``results.png`` and the
pictures of ``svf-fss figures`` under ``figures/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import load_config
from .engine import train
from .runtime import setup_process

# Sized so that frozen + SVF + full fine-tuning finish in well under 15 minutes on a 2-core CPU.
SETTINGS: dict[str, Any] = {
    "dataset": "mini",
    "method": "baseline",
    "backbone": "mobilenet_v2",
    "backbone_weights": "offline",
    "shots": 1,
    "fold": 0,
    "epochs": 10,
    "batch_size": 4,
    "lr": 0.05,  # heads; singular values / backbone at lr/10. At 0.015 nothing left background in 4 epochs
    "schedule": "cosine",
    "crop": 129,
    "test_size": 129,
    "workers": 0,
    "val_every": 100,  # evaluate once, at the end, on the test table: 200 episodes, seed 321
    "val_episodes": 200,
    "test_seeds": [321],
    "device": "cpu",
    "tensorboard": False,
    "resume": False,
}
QUICK = {"max_iterations": 3, "val_episodes": 8}


def run_mini_benchmark(
    out: Path, data_root: str | None = None, strategies: list[str] | None = None, quick: bool = False
) -> list[dict[str, Any]]:
    """Run the comparison and write its results under ``out``; returns one record per strategy."""
    from ..data.mini import make_mini

    strategies = strategies or ["frozen", "svf", "full"]
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root else out / "data"
    if not (root / "lists" / "train.txt").exists():
        print(f"generating the mini dataset in {root} ...")
        make_mini(root)
    process = setup_process("cpu")
    records = []
    for strategy in strategies:
        values = {**SETTINGS, **(QUICK if quick else {}), "strategy": strategy, "data_root": str(root)}
        values["output"] = str(out / "runs" / strategy)
        config = load_config(None, values)
        print(f"\n=== {strategy} ===")
        tic = time.perf_counter()
        summary = train(config, process)  # ends with one evaluation on the test episode table (seed 321)
        seconds = time.perf_counter() - tic
        result = summary["last"]
        records.append(
            {
                "strategy": strategy,
                "trainable": summary["trainable"],
                "iterations": summary["iterations"],
                "train_seconds": round(seconds, 1),
                "miou": result["miou"],
                "fb_iou": result["fb_iou"],
                "episodes": config.val_episodes,
            }
        )
    table = _markdown(records)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    (out / "results.md").write_text(table)
    plot = _plot(records, out / "results.png")
    if plot:
        print(f"plot: {plot}")
    _figures(out)
    return records


def _figures(out: Path) -> None:
    """The pictures of ``svf-fss figures`` (qualitative results, Figures 4-6) under ``out/figures``."""
    from ..figures import write_figures

    try:
        written = write_figures([out], out / "figures", dpi=80)
    except ImportError as err:  # matplotlib is optional: the results above are complete without pictures
        print(f"note: no figures written ({err})")
        return
    print("figures: " + ", ".join(str(path) for path in written))


def _markdown(records: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | trainable params | iterations | train time (s) | mIoU % | FB-IoU % | test episodes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['strategy']} | {r['trainable']:,d} | {r['iterations']} | {r['train_seconds']:.0f} | "
            f"{100 * r['miou']:.2f} | {100 * r['fb_iou']:.2f} | {r['episodes']} |"
        )
    return "\n".join(lines) + "\n"


def _plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plot written (pip install matplotlib)")
        return None
    names = [r["strategy"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    xs = range(len(names))
    for offset, key, label in ((-0.2, "miou", "mIoU"), (0.2, "fb_iou", "FB-IoU")):
        bars = ax.bar([x + offset for x in xs], [100 * r[key] for r in records], width=0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("mini benchmark: fold 0, 1-shot, ImageNet MobileNetV2", fontsize=9)
    ax.legend(loc="upper left", fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
