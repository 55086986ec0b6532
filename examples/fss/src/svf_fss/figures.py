"""Pictures of trained runs: qualitative FSS results, singular-value changes (SVF paper Figure 6) and subspace
activation maps (Figures 4-5).

``svf-fss figures RUN [RUN ...] --out DIR`` writes, for run folders made by ``svf-fss train`` or
``svf-fss mini-benchmark`` (a mini-benchmark folder stands for its ``runs/frozen``, ``runs/svf`` and ``runs/full``):

- ``qualitative.png``: one row per test episode: support image with its mask, query, each run's prediction,
  ground truth, with each prediction's foreground IoU on that episode;
- for the first SVF run: ``sv_changes.png`` (the largest singular-value changes of one layer) and
  ``activations.png`` (the activation maps of the directions of that layer whose singular values grew and shrank
  most, for the query image of the first episode).

Models are rebuilt as ``svf_fss.train.engine.test`` does (``config.json`` + ``best.pt``/``last.pt``), episodes
come from the run's test table (first test seed), and predictions are compared at original resolution.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import svftune
from svftune import plots

from .data import IMAGENET_MEAN, IMAGENET_STD, FSSDataset, binary_mask, to_original_size
from .data.errors import DataError
from .train.config import RunConfig, load_config

STRATEGY_ORDER = ("frozen", "svf", "full")
FOREGROUND = np.array([0.1, 0.85, 0.2])  # mask / ground truth colour
PREDICTED = np.array([0.95, 0.2, 0.15])  # prediction colour
VOID = np.array([0.6, 0.6, 0.6])


class FigureError(DataError):
    """A run folder or option the figures command cannot use (reported without a traceback)."""


@dataclass
class Run:
    """A trained run loaded for pictures: its name, folder, resolved config and model (eval mode, CPU)."""

    name: str
    folder: Path
    config: RunConfig
    model: nn.Module


# ------------------------------------------------------------------------------------------------ runs
def expand_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders from the arguments: a mini-benchmark folder (with ``runs/``) expands to its strategy runs."""
    folders: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FigureError(f"no run folder {path}")
        if (path / "config.json").is_file():
            folders.append(path)
            continue
        inner = path / "runs"
        found = sorted(
            (p for p in inner.iterdir() if (p / "config.json").is_file()) if inner.is_dir() else [],
            key=lambda p: (STRATEGY_ORDER.index(p.name) if p.name in STRATEGY_ORDER else len(STRATEGY_ORDER), p.name),
        )
        if not found:
            raise FigureError(
                f"{path} is neither a run folder (with config.json) nor a mini-benchmark folder "
                "(with runs/*/config.json)"
            )
        folders += found
    return folders


def _data_root(config: RunConfig, folder: Path, data: str | None) -> str:
    """The dataset folder: ``data`` if given, else the config's, tried as written and relative to the run's parents
    (mini-benchmark configs hold the path relative to where the benchmark was started)."""
    if data:
        if not Path(data).is_dir():
            raise FigureError(f"--data {data}: no such folder")
        return data
    written = Path(config.data_root)
    candidates = [written] if written.is_absolute() else [written, *(p / written for p in folder.resolve().parents)]
    if not written.is_absolute():
        candidates.append(folder.resolve().parents[1] / "data")  # <benchmark>/runs/<strategy> -> <benchmark>/data
    for candidate in candidates:
        if (candidate / "lists").is_dir():
            return str(candidate)
    raise FigureError(f"the dataset of {folder} ({config.data_root}) was not found: give its folder with --data")


def load_run(folder: str | Path, which: str = "best", data: str | None = None) -> Run:
    """Rebuild a trained run's model from its folder (``config.json`` + ``best.pt`` or ``last.pt``), on the CPU."""
    from .train.engine import BEST_FILE, STATE_FILE, rebuild_trained

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FigureError(f"{folder} has no config.json: not a run folder")
    values = json.loads(config_path.read_text())
    values["device"] = "cpu"
    config = load_config(None, values)
    config = dataclasses.replace(config, data_root=_data_root(config, folder, data))
    path = folder / (BEST_FILE if which == "best" else STATE_FILE)
    if not path.is_file():
        raise FigureError(f"no {which} checkpoint at {path}: train this run first")
    model, _ = rebuild_trained(config, path)
    model.eval()
    _check_base(model, path.with_suffix(".svf.safetensors"))
    return Run(config.strategy if folder.name == config.strategy else folder.name, folder, config, model)


def _check_base(model: nn.Module, svf_file: Path) -> None:
    """Refuse a rebuilt model whose adapted base weights are not the ones the run trained (per the run's
    singular-value file, when there is one): its pictures would show another network."""
    if not svf_file.is_file():
        return
    from svftune.fingerprint import weight_sha256

    checkpoint = svftune.read_svf(svf_file)
    layers = dict(svftune.svf_layers(model))
    for name, entry in checkpoint.layers.items():
        layer = layers.get(name)
        if layer is None or weight_sha256(layer.base_weight) != entry.sha256:
            raise FigureError(
                f"the model rebuilt from {svf_file.parent}/config.json does not have the base weights this run was "
                f"trained on (layer {name} differs from {svf_file.name}): were its backbone weights changed?"
            )


def test_dataset(config: RunConfig) -> FSSDataset:
    """The run's test episodes (first test seed), as ``svf_fss.train.engine.test`` builds them."""
    from .train.engine import build_datasets

    return build_datasets(config, test_seed=config.test_seeds[0])[1]


def default_episodes(dataset: FSSDataset, count: int) -> list[int]:
    """The first test episode of each novel class, in class order, then the next episodes, ``count`` in all."""
    first: dict[int, int] = {}
    for index in range(len(dataset)):
        first.setdefault(dataset.table[index].cls, index)
    chosen = [first[c] for c in sorted(first)][:count]
    chosen += [i for i in range(len(dataset)) if i not in chosen][: max(count - len(chosen), 0)]
    return chosen


# ------------------------------------------------------------------------------------------------ qualitative
@torch.no_grad()
def predict_episodes(runs: list[Run], dataset: FSSDataset, indices: list[int]) -> list[dict[str, Any]]:
    """For each episode: original support image/mask, query image, ground truth, and each run's prediction."""
    records = []
    for index in indices:
        if not 0 <= index < len(dataset):
            raise FigureError(f"episode {index} is out of range: the test table has {len(dataset)} episodes")
        episode = dataset.table[index]
        item = dataset[index]
        query, label = dataset._load(episode.query)
        support, support_label = dataset._load(episode.supports[0])
        truth = binary_mask(label, episode.cls)
        predictions, ious = {}, {}
        for run in runs:
            logits = run.model(item["query"][None], item["support"][None], item["support_mask"][None])
            prediction = to_original_size(logits.float(), truth.shape).argmax(1)[0].numpy().astype(np.uint8)
            predictions[run.name] = prediction
            ious[run.name] = foreground_iou(prediction, truth)
        records.append(
            {
                "index": index,
                "class": episode.cls,
                "class_name": dataset.spec.class_names[episode.cls - 1],
                "query": query,
                "truth": truth,
                "support": support,
                "support_mask": binary_mask(support_label, episode.cls),
                "shots": len(episode.supports),
                "predictions": predictions,
                "iou": ious,
                "item": item,
            }
        )
    return records


def foreground_iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """IoU of the foreground (1) between a prediction and a label, void (255) pixels ignored; 1.0 when both are
    empty."""
    valid = truth != 255
    pred, true = (prediction == 1) & valid, (truth == 1) & valid
    union = int((pred | true).sum())
    return 1.0 if union == 0 else int((pred & true).sum()) / union


def overlay(image: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` (uint8 or [0, 1]) with ``mask == 1`` tinted in ``color`` and void (255) in grey."""
    base = image.astype(np.float64) / (255.0 if image.dtype == np.uint8 else 1.0)
    out = base.copy()
    out[mask == 1] = (1 - alpha) * base[mask == 1] + alpha * color
    out[mask == 255] = (1 - alpha) * base[mask == 255] + alpha * VOID
    return np.clip(out, 0.0, 1.0)


def plot_qualitative(records: list[dict[str, Any]], names: list[str]):
    """Rows of [support + mask, query, prediction of each run, ground truth]; returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    if not records:
        raise FigureError("no episode to draw")
    columns = 3 + len(names)
    fig = Figure(figsize=(1.5 * columns, 1.55 * len(records) + 0.2), dpi=100, layout="constrained")
    axes = fig.subplots(len(records), columns, squeeze=False)
    for row, record in zip(axes, records, strict=True):
        shots = f" (1 of {record['shots']})" if record["shots"] > 1 else ""
        panels = [
            (overlay(record["support"], record["support_mask"], FOREGROUND), f"support{shots}: {record['class_name']}"),
            (record["query"], f"query (episode {record['index']})"),
        ]
        for name in names:
            panels.append(
                (
                    overlay(record["query"], record["predictions"][name], PREDICTED),
                    f"{name}: IoU {100 * record['iou'][name]:.0f}%",
                )
            )
        panels.append((overlay(record["query"], record["truth"], FOREGROUND), "ground truth"))
        for axis, (picture, title) in zip(row, panels, strict=True):
            axis.imshow(picture)
            axis.set_title(title, fontsize=7)
            axis.axis("off")
    return fig


# ------------------------------------------------------------------------------------------------ SVF figures
def default_layer(model: nn.Module) -> str:
    """The SVF layer (with more than one singular value per group) whose largest ``|S - S0|`` is the largest."""
    candidates = [(n, m) for n, m in svftune.svf_layers(model) if m.rank > 1] or svftune.svf_layers(model)
    if not candidates:
        raise FigureError("the model has no SVF layer")
    return max(candidates, key=lambda nm: float((nm[1].S.detach() - nm[1].S0).abs().max()))[0]


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """An ImageNet-normalised ``(3, H, W)`` tensor back to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    return (image * std + mean).clamp(0, 1)


def write_figures(
    paths: list[str | Path],
    out: str | Path,
    *,
    episodes: list[int] | None = None,
    count: int = 5,
    layer: str | None = None,
    top: int = 3,
    by: str = "absolute",
    which: str = "best",
    data: str | None = None,
    dpi: int = 100,
) -> list[Path]:
    """Write ``qualitative.png`` and, when a run uses SVF, ``sv_changes.png`` and ``activations.png`` to ``out``.

    Args:
        paths: run folders, or mini-benchmark folders (expanded to their strategy runs).
        out: output folder (created).
        episodes: test episode indices to draw (default: ``default_episodes`` with ``count``).
        count: how many episodes by default.
        layer: SVF layer for the singular-value figures (default: ``default_layer``).
        top: directions / bars per side (grew, shrank).
        by: ``"absolute"`` or ``"relative"`` change ranking.
        which: ``"best"`` or ``"last"`` checkpoint.
        data: the dataset folder, when the configs' ``data_root`` does not lead to it.
        dpi: resolution of the PNG files.

    Returns:
        The written files.
    """
    runs = [load_run(folder, which, data) for folder in expand_runs(paths)]
    first = runs[0].config
    for run in runs[1:]:
        theirs = (run.config.dataset, run.config.fold, run.config.shots, run.config.test_size)
        if theirs != (first.dataset, first.fold, first.shots, first.test_size):
            raise FigureError(
                f"{run.folder} was trained on another task ({theirs}) than {runs[0].folder}: draw them separately"
            )
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        runs = [Run(str(run.folder), run.folder, run.config, run.model) for run in runs]
        names = [run.name for run in runs]
    dataset = test_dataset(first)
    indices = episodes if episodes else default_episodes(dataset, count)
    records = predict_episodes(runs, dataset, indices)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "qualitative.png"]
    plots.to_png(plot_qualitative(records, names), written[-1], dpi=dpi)

    svf_run = next((run for run in runs if svftune.svf_layers(run.model)), None)
    if svf_run is not None:
        name = layer or default_layer(svf_run.model)
        try:
            changes = plots.singular_value_changes(svf_run.model, name, by=by)
        except plots.PlotError as err:
            raise FigureError(str(err)) from None
        title = f"{svf_run.name}: {name} ({svf_run.config.backbone}, {svf_run.config.dataset} fold {first.fold})"
        written.append(out / "sv_changes.png")
        plots.to_png(plots.plot_singular_value_changes(changes[name], top=2 * top, title=title), written[-1], dpi=dpi)
        query = records[0]["item"]["query"]
        try:
            maps = plots.subspace_activations(
                svf_run.model, name, lambda: svf_run.model.backbone(query[None]), top=top, by=by
            )
        except plots.PlotError as err:
            raise FigureError(str(err)) from None
        title = f"{svf_run.name}: {name}, query of episode {records[0]['index']} ({records[0]['class_name']})"
        written.append(out / "activations.png")
        plots.to_png(plots.plot_subspace_activations(denormalize(query), maps, title=title), written[-1], dpi=dpi)
    elif layer:
        raise FigureError(f"--layer {layer}: none of the runs uses SVF")
    return written


def cmd_figures(args) -> int:
    """``svf-fss figures``: see ``write_figures``."""
    try:
        episodes = [int(e) for e in args.episodes.split(",")] if args.episodes else None
    except ValueError:
        raise FigureError(f"--episodes {args.episodes!r}: give comma-separated integers, e.g. 0,5,12") from None
    try:
        written = write_figures(
            args.runs,
            args.out,
            episodes=episodes,
            count=args.count,
            layer=args.layer,
            top=args.top,
            by=args.by,
            which=args.checkpoint,
            data=args.data,
            dpi=args.dpi,
        )
    except ImportError as err:  # matplotlib missing: a clear message, no traceback
        raise FigureError(str(err)) from None
    for path in written:
        print(f"wrote {path}")
    return 0
