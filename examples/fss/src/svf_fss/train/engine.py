"""Training and evaluation of one run: build from a :class:`RunConfig`, train with resume, evaluate episodes."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import svftune

from ..data import FSSDataset, FSSMeter, TrainTransform, collate_episodes, get_spec, to_original_size
from ..models import build_model, build_pspnet
from .config import RunConfig, dump_config
from .runtime import (
    Process,
    atomic_torch_save,
    atomic_write_text,
    lr_factor,
    provenance,
    rng_state,
    seed_everything,
    set_rng_state,
)

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

STATE_FILE = "last.pt"
BEST_FILE = "best.pt"


# ----------------------------------------------------------------------------------------------- building
def build_datasets(config: RunConfig, test_seed: int | None = None) -> tuple[FSSDataset | None, FSSDataset]:
    """The training episodes (base classes) and the validation/test episodes (novel classes)."""
    common = {"root": config.data_root, "fold": config.fold, "shots": config.shots, "dataset": config.dataset}
    transform = None
    if config.scale is not None:
        spec = get_spec(config.dataset)
        transform = TrainTransform(config.crop or spec.train_size, tuple(config.scale))
    train = FSSDataset(
        split="train",
        seed=config.seed,
        trick=config.trick,
        size=config.crop,
        base_labels=config.method == "bam",
        transform=transform,
        **common,
    )
    episodes = config.val_episodes if test_seed is None else config.test_episodes
    val = FSSDataset(
        split="val",
        episodes=episodes,
        seed=config.test_seeds[0] if test_seed is None else test_seed,
        size=config.test_size,
        **common,
    )
    return train, val


def build_run_model(config: RunConfig) -> nn.Module:
    """The FSS model a run config describes (method, backbone, strategy, weights), SVF applied if asked."""
    model_dataset = "coco" if config.dataset == "coco" else "pascal"
    return build_model(
        config.method,
        config.backbone,
        shots=config.shots,
        strategy=config.strategy,
        weights=config.backbone_weights,
        dataset=model_dataset,
        base_learner=config.base_learner.format(**config.to_dict()) if config.base_learner else None,
        checkpoint_backbone=config.checkpoint_backbone,
        svf_form=config.svf_form,
        strategy_layers=config.strategy_layers,
        conv_kind=config.conv_kind,
        dilation=config.dilation,
        kshot=config.kshot,
    )


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.SGD:
    """SGD over the model's parameter groups, each at ``lr * lr_scale`` (singular values: lr/10)."""
    groups = []
    for group in model.param_groups():
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            scale = group.get("lr_scale", 1.0)
            if group["name"] == "lora" and config.lora_lr_scale is not None:
                scale = config.lora_lr_scale
            groups.append({"params": params, "name": group["name"], "lr_scale": scale})
    if not groups:
        raise ValueError("nothing to train: the model has no trainable parameter")
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _sync_batchnorm(model: nn.Module) -> nn.Module:
    """SyncBatchNorm conversion that keeps frozen norm layers frozen (conversion builds new modules)."""
    norms = nn.modules.batchnorm._BatchNorm
    frozen = {n for n, m in model.named_modules() if isinstance(m, norms) and "train" in m.__dict__}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, module in model.named_modules():
        if name in frozen and isinstance(module, nn.SyncBatchNorm):
            svftune.freeze_batchnorm(module)
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    return model


def _autocast(config: RunConfig, device: torch.device):
    if config.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.float16 if config.amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _batch_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward_train(model: nn.Module, batch: dict, base_channel: torch.Tensor) -> dict:
    extra = {}
    if "query_base" in batch:  # BAM: the episode class as its channel in the base learner's output
        extra = {"base_label": batch["query_base"], "episode_class": base_channel[batch["class_id"]]}
    return model(batch["query"], batch["support"], batch["support_mask"], batch["query_mask"], **extra)


# ----------------------------------------------------------------------------------------------- checkpoints
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains (head, singular values, ...): never the frozen backbone."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_run_state(path: Path, model: nn.Module, optimizer, scaler, epoch: int, iteration: int, extra: dict) -> None:
    """Atomically save what resuming needs (trainable tensors, optimizer, scaler, position, RNG states) and,
    for SVF runs, the shareable singular-value file next to it."""
    state = {
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "iteration": iteration,
        "rng": rng_state(),
        **extra,
    }
    atomic_torch_save(state, path)
    if svftune.svf_layers(model):  # the shareable singular-value file next to it
        svftune.save_svf(model, path.with_suffix(".svf.safetensors"), include_trainable=False)


def load_trainable(model: nn.Module, trainable: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into a freshly built model of the same run; names must match."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(trainable) != expected:
        missing, extra = sorted(expected - set(trainable)), sorted(set(trainable) - expected)
        raise ValueError(
            f"checkpoint does not fit this run's model (another method/backbone/strategy?): "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: FSSDataset, process: Process, config: RunConfig, desc: str = "eval"
) -> dict[str, Any]:
    """mIoU and FB-IoU over the dataset's episode table, at original resolution; episodes sharded over ranks."""
    model.eval()
    indices = list(range(process.rank, len(dataset), process.world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=1, num_workers=config.workers, collate_fn=collate_episodes)
    meter = FSSMeter(dataset.novel)
    bar = _progress(loader, desc, process, config, total=len(indices))
    for batch in bar:
        batch_device = _batch_to(batch, process.device)
        with _autocast(config, process.device):
            logits = model(batch_device["query"], batch_device["support"], batch_device["support_mask"])
        for i, label in enumerate(batch["query_label"]):
            full = to_original_size(logits[i : i + 1].float(), batch["orig_size"][i].tolist())
            meter.update(full.argmax(1)[0].cpu(), label, int(batch["class_id"][i]))
    if process.distributed:
        _reduce_meter(meter, process)
    return meter.summary()


def _reduce_meter(meter: FSSMeter, process: Process) -> None:
    classes = meter.classes
    counts = [meter.inter[c] for c in classes] + [meter.union[c] for c in classes]
    counts += [meter.episodes[c] for c in classes] + meter.fb_inter + meter.fb_union
    tensor = torch.tensor(counts, dtype=torch.float64, device=process.device)
    dist.all_reduce(tensor)
    values = [int(v) for v in tensor.tolist()]
    n = len(classes)
    for k, c in enumerate(classes):
        meter.inter[c], meter.union[c], meter.episodes[c] = values[k], values[n + k], values[2 * n + k]
    meter.fb_inter, meter.fb_union = values[3 * n : 3 * n + 2], values[3 * n + 2 : 3 * n + 4]


def _progress(iterable, desc: str, process: Process, config: RunConfig, total: int | None = None):
    if tqdm is None or not config.progress or not process.is_main:
        return iterable
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------------------------- training
class _Log:
    """evals.csv + evals.jsonl, and TensorBoard scalars when the package is installed (main process only)."""

    def __init__(self, out: Path, config: RunConfig, process: Process) -> None:
        self.out, self.active = out, process.is_main
        self.writer = None
        if self.active and config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("note: tensorboard is not installed; logging to CSV/JSON only (pip install tensorboard)")

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def evaluation(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.out / "evals.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        path = self.out / "evals.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", "iteration", "miou", "fb_iou", "loss", "seconds"])
            writer.writerow([record[k] for k in ("epoch", "iteration", "miou", "fb_iou", "loss", "seconds")])
        for key in ("miou", "fb_iou"):
            self.scalar(f"val/{key}", record[key], record["iteration"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _set_lr(optimizer: torch.optim.Optimizer, config: RunConfig, iteration: int, total: int) -> float:
    """Per-iteration schedule: every group at ``lr * lr_scale * factor``; returns the factor."""
    factor = lr_factor(config.schedule, iteration, total, config.poly_power)
    for group in optimizer.param_groups:
        group["lr"] = config.lr * group["lr_scale"] * factor
    return factor


def _step(compute_loss, model: nn.Module, optimizer, scaler, config: RunConfig) -> torch.Tensor:
    """One optimisation step (autocast, optional gradient scaler and clipping); returns the detached loss."""
    with _autocast(config, next(model.parameters()).device):
        loss = compute_loss()
    if not torch.isfinite(loss):  # before any update: the last checkpoint stays a good one
        raise FloatingPointError(f"training loss is {loss.item()}: lower the lr, or use amp=bf16 instead of fp16")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach()


def _loader(dataset: FSSDataset, config: RunConfig, process: Process, epoch: int) -> DataLoader:
    dataset.set_epoch(epoch)
    per_process = max(config.batch_size // process.world_size, 1)
    sampler = None
    if process.distributed:
        sampler = DistributedSampler(dataset, process.world_size, process.rank, shuffle=False, drop_last=True)
    return DataLoader(
        dataset,
        batch_size=per_process,
        sampler=sampler,
        num_workers=config.workers,
        drop_last=True,
        pin_memory=process.device.type == "cuda",
        persistent_workers=False,
    )


def _start_run(config: RunConfig, process: Process) -> Path:
    """Create the run folder with its resolved config and provenance, and seed this process."""
    out = config.output_dir()
    if process.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "config.json")
        atomic_write_text(json.dumps(provenance(config.seed), indent=2) + "\n", out / "provenance.json")
    seed_everything(config.seed + process.rank)
    return out


def train(config: RunConfig, process: Process) -> dict[str, Any]:
    """Train one run (resuming when its folder has a last checkpoint) and return its summary."""
    out = _start_run(config, process)
    train_set, val_set = build_datasets(config)
    model = build_run_model(config).to(process.device)
    if process.distributed and config.sync_bn and process.device.type == "cuda":
        model = _sync_batchnorm(model)
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" and process.device.type == "cuda" else None
    per_epoch = len(train_set) // max(config.batch_size, 1)
    if per_epoch < 1:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {len(train_set)} training episodes")
    total = per_epoch * config.epochs
    if config.max_iterations is not None:
        total = min(total, config.max_iterations)
    epochs = math.ceil(total / per_epoch)

    start_epoch, iteration, best = 0, 0, {"miou": -1.0}
    state_path = out / STATE_FILE
    if config.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        load_trainable(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, iteration, best = state["epoch"] + 1, state["iteration"], state.get("best", best)
        if process.is_main:
            print(f"resuming {out} after epoch {state['epoch'] + 1} (iteration {iteration})")

    # base class base[i] is channel i + 1 of BAM's base learner (data.base_label_map numbers them so)
    base_channel = torch.zeros(max(train_set.base) + 1, dtype=torch.long, device=process.device)
    base_channel[torch.tensor(train_set.base)] = torch.arange(1, len(train_set.base) + 1, device=process.device)
    net = model
    if process.distributed:
        device_ids = [process.device.index] if process.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=config.method == "bam")
    log = _Log(out, config, process)
    last_eval: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, epochs):
            if iteration >= total:
                break
            net.train()
            loader = _loader(train_set, config, process, epoch)
            bar = _progress(loader, f"epoch {epoch + 1}/{epochs}", process, config)
            running, seen, tic = 0.0, 0, time.perf_counter()
            for batch in bar:
                if iteration >= total:
                    break
                batch = _batch_to(batch, process.device)
                factor = _set_lr(optimizer, config, iteration, total)
                loss = _step(
                    lambda b=batch: _forward_train(net, b, base_channel)["loss"], model, optimizer, scaler, config
                )
                iteration += 1
                running += loss.item()
                seen += 1
                rate = seen * config.batch_size / (time.perf_counter() - tic)
                log.scalar("train/loss", loss.item(), iteration)
                log.scalar("train/lr", config.lr * factor, iteration)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{config.lr * factor:.2e}", img_s=f"{rate:.1f}")
            done = iteration >= total or epoch == epochs - 1
            extra: dict[str, Any] = {"best": best}
            if (epoch + 1) % config.val_every == 0 or done:
                tic_eval = time.perf_counter()
                summary = evaluate(model, val_set, process, config, desc=f"val epoch {epoch + 1}")
                last_eval = {
                    "epoch": epoch + 1,
                    "iteration": iteration,
                    "miou": summary["miou"],
                    "fb_iou": summary["fb_iou"],
                    "loss": running / max(seen, 1),
                    "seconds": round(time.perf_counter() - tic_eval, 2),
                }
                log.evaluation(last_eval)
                if process.is_main:
                    print(f"epoch {epoch + 1}: mIoU {summary['miou']:.4f} FB-IoU {summary['fb_iou']:.4f}")
                if summary["miou"] > best["miou"]:
                    best = dict(last_eval)
                    extra["best"] = best
                    if process.is_main:
                        save_run_state(out / BEST_FILE, model, optimizer, scaler, epoch, iteration, extra)
            if process.is_main:
                save_run_state(state_path, model, optimizer, scaler, epoch, iteration, extra)
            if process.distributed:
                dist.barrier()
    finally:
        log.close()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    by_group = {g["name"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    summary = {
        "best": best,
        "last": last_eval,
        "iterations": iteration,
        "trainable": trainable,
        "trainable_groups": by_group,
        "output": str(out),
    }
    if process.is_main:
        atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "train_summary.json")
    return summary


def rebuild_trained(config: RunConfig, path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A run's model on the CPU with the trainable tensors of its saved state ``path``, and that state."""
    # seeded as rank 0 was when training built the model (DDP broadcast rank 0's weights): a backbone without
    # pretrained weights gets the same random initialisation, so the saved trainable tensors fit it
    seed_everything(config.seed)
    model = build_run_model(config)
    state = torch.load(path, map_location="cpu", weights_only=False)
    load_trainable(model, state["trainable"])
    return model, state


def test(config: RunConfig, process: Process, which: str | None = None) -> dict[str, Any]:
    """Evaluate a trained run's best or last checkpoint on the test episodes, once per test seed."""
    out = config.output_dir()
    which = which or config.test_checkpoint
    path = out / (BEST_FILE if which == "best" else STATE_FILE)
    if not path.exists():
        raise FileNotFoundError(f"no {which} checkpoint at {path}: train this run first (svf-fss train ...)")
    model, state = rebuild_trained(config, path)
    model.to(process.device)
    results = []
    for seed in config.test_seeds:
        _, test_set = build_datasets(config, test_seed=seed)
        summary = evaluate(model, test_set, process, config, desc=f"test seed {seed}")
        results.append({"seed": seed, "miou": summary["miou"], "fb_iou": summary["fb_iou"]})
    record = {
        "checkpoint": which,
        "epoch": state["epoch"] + 1,
        "episodes": config.test_episodes,
        "seeds": results,
        "miou": sum(r["miou"] for r in results) / len(results),
        "fb_iou": sum(r["fb_iou"] for r in results) / len(results),
    }
    if process.is_main:
        atomic_write_text(json.dumps(record, indent=2) + "\n", out / f"test_{which}.json")
    return record


def iterate_folds(config: RunConfig, folds: list[int]) -> Iterator[RunConfig]:
    """One copy of ``config`` per fold."""
    for fold in folds:
        yield dataclasses.replace(config, fold=fold)


def train_base_learner(config: RunConfig, process: Process) -> Path:
    """BAM stage 1: train the PSPNet base learner on the fold's base classes; returns the ``pspnet.pth`` path.

    Every training episode's query image and its base-class map (base class ``base[i]`` -> ``i + 1``) form one
    sample; the whole network trains (BatchNorm included), with the config's schedule (BAM: poly 0.9).
    """
    out = _start_run(config, process)
    train_set, _ = build_datasets(dataclasses.replace(config, method="bam", shots=1))
    model = build_pspnet(config.backbone, "coco" if config.dataset == "coco" else "pascal", dilation=config.dilation)
    if config.backbone_weights:
        from ..models import load_backbone_weights

        load_backbone_weights(model.backbone, config.backbone_weights)
    model = model.to(process.device)
    optimizer = build_optimizer(model, config)
    net = model
    if process.distributed:
        device_ids = [process.device.index] if process.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    per_epoch = max(len(train_set) // config.batch_size, 1)
    total = per_epoch * config.epochs if config.max_iterations is None else config.max_iterations
    iteration = 0
    for epoch in range(math.ceil(total / per_epoch)):
        net.train()
        bar = _progress(_loader(train_set, config, process, epoch), f"base learner epoch {epoch + 1}", process, config)
        for batch in bar:
            if iteration >= total:
                break
            batch = _batch_to(batch, process.device)
            factor = _set_lr(optimizer, config, iteration, total)
            loss = _step(lambda b=batch: net(b["query"], b["query_base"])["loss"], model, optimizer, None, config)
            iteration += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{config.lr * factor:.2e}")
    path = out / "pspnet.pth"
    if process.is_main:
        atomic_torch_save(model.state_dict(), path)
        print(f"base learner written to {path} ({iteration} iterations)")
    if process.distributed:
        dist.barrier()
    return path
