"""``svf-fss study``: does SVF beat a frozen backbone, full fine-tuning and LoRA on the mini data?

Every fold x seed x strategy is one run of the mini benchmark's settings (:data:`SETTINGS`: baseline method, 1-shot,
real ImageNet MobileNetV2, 10 epochs), so the study answers the mini benchmark's question with repetitions.

- Seeds change the training only (head initialisation, data order, augmentation: ``RunConfig.seed``); the test
  episode table of a fold is the same for every seed and strategy (``test_seeds`` stays ``[321]``), so runs of the
  same fold and seed pair up and the differences between strategies are paired.
- An overfitting probe: the same runs at a ``long_factor`` times longer schedule (default 3x the epochs) for
  ``long_strategies`` (default SVF and full fine-tuning), so that one sees whether full fine-tuning degrades with
  more training where SVF does not. A longer schedule is the probe because the mini data is fixed and small
  (320 training images over 15 base classes per fold): "fewer images" would change the dataset, a longer schedule
  only the amount of fitting.
- Each finished run appends one JSON line to ``records.jsonl`` (flushed and fsynced); a run in progress keeps
  its checkpoint in its run folder. Interrupt the study at any point and run the same command again: finished
  runs are skipped, an interrupted run resumes from its last epoch.
- :mod:`svf_fss.train.study_report` turns the records into ``summary.json``, ``results.md``, ``results.png`` and
  ``records.csv`` after every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
from .mini_benchmark import QUICK, SETTINGS

STRATEGIES = ("frozen", "svf", "full", "lora")
SEEDS = (321, 322, 323)
FOLDS = (0, 1, 2, 3)
RECORDS = "records.jsonl"
PLAN = "study.json"


@dataclass
class StudyPlan:
    """What a study runs. ``settings`` are the run settings every run shares (the mini benchmark's)."""

    folds: list[int] = field(default_factory=lambda: list(FOLDS))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    long_factor: int = 3
    long_strategies: list[str] = field(default_factory=lambda: ["svf", "full"])
    long_seeds: list[int] = field(default_factory=lambda: [SEEDS[0]])
    quick: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.settings:
            self.settings = {**SETTINGS, **(QUICK if self.quick else {})}
        for fold in self.folds:
            if fold not in FOLDS:
                raise ConfigError(f"study folds must be among 0, 1, 2, 3, got {fold}")
        if not self.folds or not self.seeds or not self.strategies:
            raise ConfigError("a study needs at least one fold, one seed and one strategy")
        if self.long_factor < 1:
            raise ConfigError(f"long_factor must be >= 1 (1 turns the probe off), got {self.long_factor}")
        for name in (*self.strategies, *self.long_strategies):
            _check_strategy(name)

    def runs(self) -> list[dict[str, Any]]:
        """Every run's key, in execution order: the main grid seed by seed (so that a partial study covers every
        fold), then the long-schedule probe."""
        keys = [
            {"schedule": 1, "fold": f, "seed": s, "strategy": name}
            for s in self.seeds
            for f in self.folds
            for name in self.strategies
        ]
        if self.long_factor > 1:
            keys += [
                {"schedule": self.long_factor, "fold": f, "seed": s, "strategy": name}
                for s in self.long_seeds
                for f in self.folds
                for name in self.long_strategies
            ]
        return keys

    def run_values(self, key: dict[str, Any], out: Path, data_root: Path) -> dict[str, Any]:
        """The config values of one run (its schedule scaled by ``key["schedule"]``)."""
        values = {**self.settings, "fold": key["fold"], "seed": key["seed"], "strategy": key["strategy"]}
        values["epochs"] = self.settings["epochs"] * key["schedule"]
        if values.get("max_iterations"):
            values["max_iterations"] = self.settings["max_iterations"] * key["schedule"]
        values.update(data_root=str(data_root), output=str(out / "runs" / run_name(key)), resume=True)
        values["progress"] = False
        return values


def _check_strategy(name: str) -> None:
    from ..models.strategies import parse_strategy

    try:
        parse_strategy(name)
    except ValueError as err:
        raise ConfigError(f"study strategy {name!r}: {err}") from None


def run_name(key: dict[str, Any]) -> str:
    """``x1/fold0/seed321/svf``: one run's folder under ``runs/``."""
    safe = key["strategy"].replace(":", "_").replace(",", "_").replace("=", "")
    return f"x{key['schedule']}/fold{key['fold']}/seed{key['seed']}/{safe}"


def _key(record: dict[str, Any]) -> tuple:
    return (record["schedule"], record["fold"], record["seed"], record["strategy"])


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of finished runs; a torn last line (a study killed while writing it) is ignored."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ConfigError(f"{path}:{number} is not a JSON record; fix or remove that line") from None
        records.append(record)
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):  # drop a torn last line before appending
        text = text[: text.rfind("\n") + 1]
        from .runtime import atomic_write_text

        atomic_write_text(text, path)
    with path.open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _check_plan(out: Path, plan: StudyPlan) -> None:
    """A study folder belongs to one plan's settings: resuming with other settings would mix incomparable runs."""
    from .runtime import atomic_write_text

    path = out / PLAN
    mine = asdict(plan)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") != json.loads(json.dumps(mine["settings"])):
            raise ConfigError(
                f"{out} holds a study with other run settings ({path}); use another --out, or delete it to restart"
            )
        # folds, seeds and strategies may grow between invocations: the records say what ran
    atomic_write_text(json.dumps(mine, indent=2) + "\n", path)


@contextlib.contextmanager
def claim(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` without waiting; yields ``False`` when another process (or another open
    of the same file) holds it. The OS releases the lock of a killed process, so no stale claim survives a crash.
    Without ``fcntl`` (Windows) every claim succeeds: run one study process there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
        yield True  # closing the file releases the lock


@contextlib.contextmanager
def _records_lock(out: Path) -> Iterator[None]:
    with (out / (RECORDS + ".lock")).open("a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_study(
    out: Path,
    plan: StudyPlan | None = None,
    data_root: str | Path | None = None,
    *,
    threads: int | None = None,
    keep_checkpoints: bool = False,
) -> list[dict[str, Any]]:
    """Run (or resume) a study under ``out``; returns every record. Writes the report after each run.

    Several processes may run the same command on the same ``out`` at once (one per core, with ``threads=1``):
    each run is claimed with a lock, so every run trains once and the records file is appended under a lock."""
    import torch

    from ..data.mini import make_mini
    from .engine import train
    from .runtime import setup_process
    from .study_report import write_report

    plan = plan or StudyPlan()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root else out / "data"
    with _records_lock(out):
        if not (root / "lists" / "train.txt").exists():
            print(f"generating the mini dataset in {root} ...")
            make_mini(root)
        _check_plan(out, plan)
        records = read_records(out / RECORDS)
    if threads:
        torch.set_num_threads(threads)
    keys = plan.runs()
    print(f"study in {out}: {len(_done(records, keys))} of {len(keys)} runs done")
    process = setup_process("cpu")
    for key in keys:
        if _key(key) in _done(records, keys):
            continue
        with claim(out / "runs" / (run_name(key) + ".lock")) as mine:
            if not mine:  # another process trains it
                continue
            with _records_lock(out):
                records = read_records(out / RECORDS)
            if _key(key) in _done(records, keys):  # finished by another process meanwhile
                continue
            record = _train_one(key, plan, out, root, process, train)
            with _records_lock(out):
                _append(out / RECORDS, record)
                records = read_records(out / RECORDS)
                write_report(out, records, plan)
            if not keep_checkpoints:  # a finished run needs no resume state; full fine-tuning's is ~50 MB
                for name in ("last.pt", "best.pt"):
                    (out / "runs" / run_name(key) / name).unlink(missing_ok=True)
        print(
            f"[{len(_done(records, keys))}/{len(keys)}] x{key['schedule']} fold {key['fold']} seed {key['seed']} "
            f"{key['strategy']}: mIoU {100 * record['miou']:.2f} FB-IoU {100 * record['fb_iou']:.2f} "
            f"({record['train_seconds']:.0f} s, load {record['load_start']:.1f})",
            flush=True,
        )
    with _records_lock(out):
        records = read_records(out / RECORDS)
        write_report(out, records, plan)
    return records


def _done(records: list[dict[str, Any]], keys: list[dict[str, Any]]) -> set[tuple]:
    planned = {_key(k) for k in keys}
    return {_key(r) for r in records} & planned


def _train_one(key: dict[str, Any], plan: StudyPlan, out: Path, root: Path, process: Any, train: Any) -> dict:
    import torch

    config = load_config(None, plan.run_values(key, out, root))
    resumed = (config.output_dir() / "last.pt").exists()
    load_start = os.getloadavg()[0]
    tic = time.perf_counter()
    summary = train(config, process)
    seconds = time.perf_counter() - tic
    groups = summary.get("trainable_groups", {})
    return {
        **key,
        "epochs": config.epochs,
        "iterations": summary["iterations"],
        "miou": summary["last"]["miou"],
        "fb_iou": summary["last"]["fb_iou"],
        "train_seconds": round(seconds, 1),
        "resumed": resumed,  # train_seconds then covers the resumed part only
        "trainable": summary["trainable"],
        "trainable_backbone": sum(v for k, v in groups.items() if k != "head"),
        "test_episodes": config.val_episodes,
        "threads": torch.get_num_threads(),
        "load_start": round(load_start, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }


__all__ = ["FOLDS", "SEEDS", "STRATEGIES", "StudyPlan", "claim", "read_records", "run_name", "run_study"]
