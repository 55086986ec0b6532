"""The study's statistics and report: means with 95% confidence intervals, paired differences, a table, a plot.

Intervals are Student-t intervals over the runs (one run = one fold and seed): ``mean +- t(0.975, n-1) * sd /
sqrt(n)``. Differences are paired: ``svf - other`` is taken run by run over the (fold, seed) pairs both strategies
finished at the same schedule, on the same test episodes, so the fold-to-fold spread (some folds are harder)
cancels. Runs of different folds are treated as independent samples of "a fold and a seed"; with four folds the
interval describes this mini benchmark, not few-shot segmentation at large.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

# Two-sided 95% Student-t critical values t(0.975, df) for df = 1..30 (standard table values).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
#: SVF against these first, in this order; then against every other strategy the records hold (ablations).
COMPARISONS = (("svf", "frozen"), ("svf", "full"), ("svf", "lora"))
CSV_FIELDS = (
    "schedule", "fold", "seed", "strategy", "miou", "fb_iou", "train_seconds", "iterations", "epochs",
    "trainable", "trainable_backbone", "test_episodes", "threads", "load_start", "load_end", "resumed", "finished",
)  # fmt: skip


def t_critical(df: int) -> float:
    """t(0.975, df): the table up to 30 degrees of freedom, then the Cornish-Fisher expansion around the normal
    quantile (three terms; within 1e-4 of the exact value from df = 31 on)."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def interval(values: list[float]) -> dict[str, Any]:
    """``{"n", "mean", "sd", "lo", "hi"}``; with a single value the interval is undefined (``None``)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def _by(records: list[dict[str, Any]], schedule: int, strategy: str) -> dict[tuple[int, int], dict[str, Any]]:
    return {(r["fold"], r["seed"]): r for r in records if r["schedule"] == schedule and r["strategy"] == strategy}


def paired(records: list[dict[str, Any]], a: str, b: str, schedule: int = 1, metric: str = "miou") -> dict | None:
    """``a - b`` over the (fold, seed) runs both finished at ``schedule``; ``None`` without a common run."""
    runs_a, runs_b = _by(records, schedule, a), _by(records, schedule, b)
    common = sorted(set(runs_a) & set(runs_b))
    if not common:
        return None
    diffs = [runs_a[k][metric] - runs_b[k][metric] for k in common]
    return {**interval(diffs), "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per schedule and strategy: intervals of mIoU / FB-IoU, mean train time, trainable counts; paired
    comparisons; and the schedule effect (long - default) per strategy, paired by (fold, seed)."""
    schedules = sorted({r["schedule"] for r in records})
    out: dict[str, Any] = {"strategies": {}, "paired": {}, "schedule_effect": {}}
    for schedule in schedules:
        names = list(dict.fromkeys(r["strategy"] for r in records if r["schedule"] == schedule))
        for name in names:
            runs = list(_by(records, schedule, name).values())
            out["strategies"][f"x{schedule}/{name}"] = {
                "schedule": schedule,
                "strategy": name,
                "miou": interval([r["miou"] for r in runs]),
                "fb_iou": interval([r["fb_iou"] for r in runs]),
                "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs),
                "trainable": runs[0]["trainable"],
                "trainable_backbone": runs[0]["trainable_backbone"],
                "load": sum((r["load_start"] + r["load_end"]) / 2 for r in runs) / len(runs),
            }
        others = [("svf", name) for name in names if name != "svf" and ("svf", name) not in COMPARISONS]
        for a, b in (*COMPARISONS, *others):
            pair = {m: paired(records, a, b, schedule, m) for m in ("miou", "fb_iou")}
            if pair["miou"] is not None:
                out["paired"][f"x{schedule}/{a}-{b}"] = pair
    long = [s for s in schedules if s > 1]
    for schedule in long:
        for name in dict.fromkeys(r["strategy"] for r in records if r["schedule"] == schedule):
            short, longer = _by(records, 1, name), _by(records, schedule, name)
            common = sorted(set(short) & set(longer))
            if common:
                diffs = [longer[k]["miou"] - short[k]["miou"] for k in common]
                out["schedule_effect"][f"x{schedule}-x1/{name}"] = interval(diffs)
    return out


def _pct(stats: dict[str, Any]) -> str:
    text = f"{100 * stats['mean']:.2f}"
    if stats["lo"] is not None:
        text += f" [{100 * stats['lo']:.2f}, {100 * stats['hi']:.2f}]"
    return text


def _diff(stats: dict[str, Any]) -> str:
    text = f"{100 * stats['mean']:+.2f}"
    if stats["lo"] is not None:
        text += f" [{100 * stats['lo']:+.2f}, {100 * stats['hi']:+.2f}]"
    return text


def markdown(summary: dict[str, Any], total_runs: int, planned_runs: int) -> str:
    """The study's tables (percentages; brackets: 95% confidence intervals)."""
    lines = [
        f"Runs finished: {total_runs} of {planned_runs}. Brackets: 95% confidence intervals (Student t over runs).",
        "",
        "| schedule | strategy | runs | mIoU % | FB-IoU % | trainable (backbone) | train s / run | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["strategies"].values():
        lines.append(
            f"| x{row['schedule']} | {row['strategy']} | {row['miou']['n']} | {_pct(row['miou'])} | "
            f"{_pct(row['fb_iou'])} | {row['trainable']:,d} ({row['trainable_backbone']:,d}) | "
            f"{row['train_seconds']:.0f} | {row['load']:.1f} |"
        )
    if summary["paired"]:
        lines += [
            "",
            "Paired differences (same fold, seed and test episodes), percentage points:",
            "",
            "| schedule | difference | pairs | mIoU | FB-IoU | SVF better / worse (mIoU) |",
            "|---|---|---|---|---|---|",
        ]
        for name, pair in summary["paired"].items():
            schedule, label = name.split("/")
            lines.append(
                f"| {schedule} | {label.replace('-', ' - ')} | {pair['miou']['n']} | {_diff(pair['miou'])} | "
                f"{_diff(pair['fb_iou'])} | {pair['miou']['wins']} / {pair['miou']['losses']} |"
            )
    if summary["schedule_effect"]:
        lines += [
            "",
            "Overfitting probe: longer schedule minus default, mIoU percentage points, paired by fold and seed:",
            "",
            "| change | runs | mIoU difference |",
            "|---|---|---|",
        ]
        for name, stats in summary["schedule_effect"].items():
            lines.append(f"| {name} | {stats['n']} | {_diff(stats)} |")
    return "\n".join(lines) + "\n"


def records_csv(records: list[dict[str, Any]]) -> str:
    """One row per run, the columns of :data:`CSV_FIELDS`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in sorted(records, key=lambda r: (r["schedule"], r["fold"], r["seed"], r["strategy"])):
        writer.writerow(record)
    return buffer.getvalue()


def plot(summary: dict[str, Any], records: list[dict[str, Any]], path: Path) -> Path | None:
    """Means with 95% intervals and every run as a dot; paired differences; the schedule probe. ``None`` without
    matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = [r for r in summary["strategies"].values() if r["schedule"] == 1]
    fig = Figure(figsize=(11, 3.6), dpi=110)
    axes = fig.subplots(1, 3)
    for x, row in enumerate(rows):
        stats = row["miou"]
        dots = [100 * r["miou"] for r in records if r["schedule"] == 1 and r["strategy"] == row["strategy"]]
        axes[0].scatter([x + 0.15] * len(dots), dots, s=8, color="0.6", zorder=1)
        err = (
            None
            if stats["lo"] is None
            else [[100 * (stats["mean"] - stats["lo"])], [100 * (stats["hi"] - stats["mean"])]]
        )
        axes[0].errorbar([x], [100 * stats["mean"]], yerr=err, fmt="o", capsize=4, zorder=2)
    axes[0].set_xticks(range(len(rows)), [r["strategy"] for r in rows])
    axes[0].set_ylabel("mIoU % (test episodes)")
    axes[0].set_title("per strategy: mean, 95% CI, runs", fontsize=9)
    pairs = [(k, v["miou"]) for k, v in summary["paired"].items() if k.startswith("x1/")]
    for x, (_, stats) in enumerate(pairs):
        err = (
            None
            if stats["lo"] is None
            else [[100 * (stats["mean"] - stats["lo"])], [100 * (stats["hi"] - stats["mean"])]]
        )
        axes[1].errorbar([x], [100 * stats["mean"]], yerr=err, fmt="s", capsize=4)
    axes[1].axhline(0, color="0.5", lw=0.8)
    axes[1].set_xticks(range(len(pairs)), [k.split("/")[1].replace("-", " - ") for k, _ in pairs])
    axes[1].set_ylabel("paired mIoU difference, points")
    axes[1].set_title("SVF minus the others (same fold, seed, episodes)", fontsize=9)
    longs = sorted({r["schedule"] for r in summary["strategies"].values()})
    for name in dict.fromkeys(r["strategy"] for r in summary["strategies"].values() if r["schedule"] > 1):
        points = [(s, summary["strategies"].get(f"x{s}/{name}")) for s in longs]
        points = [(s, row["miou"]) for s, row in points if row is not None]
        xs = [s for s, _ in points]
        ys = [100 * st["mean"] for _, st in points]
        err = [[100 * (st["mean"] - _lo(st)) for _, st in points], [100 * (_hi(st) - st["mean"]) for _, st in points]]
        axes[2].errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=name)
    if len(longs) > 1:
        axes[2].set_xticks(longs, [f"x{s}" for s in longs])
        axes[2].legend(fontsize=8)
    axes[2].set_xlabel("schedule (epochs x10)")
    axes[2].set_ylabel("mIoU %")
    axes[2].set_title("overfitting probe: longer training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _lo(stats: dict[str, Any]) -> float:
    return stats["mean"] if stats["lo"] is None else stats["lo"]


def _hi(stats: dict[str, Any]) -> float:
    return stats["mean"] if stats["hi"] is None else stats["hi"]


def write_report(out: Path, records: list[dict[str, Any]], plan: Any) -> dict[str, Any]:
    """Write ``summary.json``, ``results.md``, ``records.csv`` and ``results.png`` (if matplotlib) under ``out``."""
    from .runtime import atomic_write_text

    summary = summarize(records) if records else {"strategies": {}, "paired": {}, "schedule_effect": {}}
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    atomic_write_text(markdown(summary, len(records), len(plan.runs())), out / "results.md")
    atomic_write_text(records_csv(records), out / "records.csv")
    if records:
        plot(summary, records, out / "results.png")
    return summary


__all__ = ["interval", "markdown", "paired", "plot", "records_csv", "summarize", "t_critical", "write_report"]
