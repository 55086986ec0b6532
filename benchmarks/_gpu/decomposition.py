"""Decomposition speed on the device: ``apply_svf`` against the bare SVDs of the same folded weights.

- ResNet-50 layers 2-4 (42 layers; ``--quick``: ResNet-18 layers 2-3): ``apply_svf`` on a copy of the model on
  the device (which runs ``svftune.thin_svd``: float64, QR first for strongly rectangular weights) against the sum
  of bare ``torch.linalg.svd`` calls on the same folded weights in float64 and in float32, and ``thin_svd`` alone.
  One warm-up round, then repeats while the section's time allows; medians.
- VGG16, every layer (its 4096 x 25088 classifier included; ``--quick``: a small VGG-like net with a 384 x 2304
  classifier): ``apply_svf`` once, the per-layer bare SVDs in float32, then float64, the largest layer last
  (the slowest call; if the section's limit stops it, the rest is kept).
"""

from __future__ import annotations

import copy
import time

import torch
import torchvision
from torch import Tensor, nn

import svftune
from svftune.decompose import thin_svd
from svftune.matching import select_layers

from .common import RESNET_LAYERS, Context, fmt, median, timed

#: apply_svf may cost at most this times the thin_svd calls it makes, plus APPLY_SLACK_S (casts, copies)
APPLY_OVERHEAD = 2.0
APPLY_SLACK_S = 0.5
QUICK_LAYERS = ["layer2", "layer3"]  # --quick: ResNet-18's layer4 SVDs alone take seconds on a busy CPU


def _folded(module: nn.Module) -> Tensor:
    weight = module.weight.detach()
    groups = getattr(module, "groups", 1)
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def _bare(weights: list[Tensor], dtype: torch.dtype) -> None:
    for w in weights:
        torch.linalg.svd(w.to(dtype), full_matrices=False)


def _thin(weights: list[Tensor]) -> None:
    for w in weights:
        thin_svd(w)


def _small_vgg() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(6),
        nn.Flatten(),
        nn.Linear(64 * 6 * 6, 384),  # 384 x 2304: as wide as VGG16's 4096 x 25088 first classifier layer
        nn.ReLU(),
        nn.Linear(384, 384),
        nn.ReLU(),
        nn.Linear(384, 10),
    )


def _resnet(ctx: Context, rows: list) -> None:
    report = ctx.report
    torch.manual_seed(0)
    plain = (torchvision.models.resnet18() if ctx.quick else torchvision.models.resnet50()).to(ctx.device)
    layers = QUICK_LAYERS if ctx.quick else RESNET_LAYERS
    weights = [_folded(m) for _, m in select_layers(plain, layers)]
    stop = time.time() + ctx.left() * 0.45  # the rest is VGG16's
    runs: dict[str, list[float]] = {"apply_svf": [], "thin_svd": [], "svd_float64": [], "svd_float32": []}
    for repeat in range(1 if ctx.quick else 6):
        model = copy.deepcopy(plain)
        times = {
            "apply_svf": timed(lambda m=model: svftune.apply_svf(m, layers, progress=False), ctx),
            "thin_svd": timed(lambda: _thin(weights), ctx),
            "svd_float64": timed(lambda: _bare(weights, torch.float64), ctx),
            "svd_float32": timed(lambda: _bare(weights, torch.float32), ctx),
        }
        del model
        if repeat == 0 and not ctx.quick:
            report.metric("resnet.first_round_seconds", times)  # includes cuSOLVER/cuBLAS start-up
            continue
        for key, value in times.items():
            runs[key].append(value)
        if time.time() > stop:
            break
    med = {key: median(values) for key, values in runs.items()}
    report.metric("resnet.median_seconds", med)
    report.metric("resnet.repeats", len(runs["apply_svf"]))
    report.metric("resnet.layers", len(weights))
    limit = APPLY_OVERHEAD * med["thin_svd"] + APPLY_SLACK_S
    report.check("resnet: apply_svf costs about the thin_svd calls it makes", med["apply_svf"] <= limit, med, limit)
    name = "resnet18" if ctx.quick else "resnet50"
    rows.append([f"{name} {','.join(layers)}", len(weights)] + [fmt(med[k]) for k in runs])
    rows[-1].append(fmt(med["apply_svf"] / med["svd_float64"]))


def _vgg(ctx: Context, rows: list) -> None:
    report = ctx.report
    torch.manual_seed(0)
    model = (_small_vgg() if ctx.quick else torchvision.models.vgg16()).to(ctx.device)
    named = select_layers(model, None)
    weights = [_folded(m) for _, m in named]
    big = max(range(len(weights)), key=lambda i: weights[i].numel())
    big_name, big_shape = named[big][0], list(weights[big].shape[1:])
    report.metric("vgg.classifier", {"name": big_name, "shape": big_shape})
    seconds = {"thin_svd": timed(lambda: _thin(weights), ctx)}
    report.metric("vgg.thin_svd_seconds", seconds["thin_svd"])
    seconds["apply_svf"] = timed(lambda: svftune.apply_svf(model, None, progress=False), ctx)
    report.metric("vgg.apply_svf_seconds", seconds["apply_svf"])
    others = [w for i, w in enumerate(weights) if i != big]
    for dtype in (torch.float32, torch.float64):
        key = f"svd_{str(dtype).split('.')[-1]}"
        if not ctx.time_for(10):
            report.short(f"VGG bare {key}")
            continue
        rest = timed(lambda d=dtype: _bare(others, d), ctx)
        report.metric(f"vgg.{key}_without_classifier_seconds", rest)
        one = timed(lambda d=dtype: _bare([weights[big]], d), ctx)
        report.metric(f"vgg.classifier_{key}_seconds", one)
        seconds[key] = rest + one
    classifier_thin = timed(lambda: thin_svd(weights[big]), ctx)
    report.metric("vgg.classifier_thin_svd_seconds", classifier_thin)
    limit = APPLY_OVERHEAD * seconds["thin_svd"] + APPLY_SLACK_S
    report.check(
        "vgg: apply_svf costs about the thin_svd calls it makes", seconds["apply_svf"] <= limit, seconds, limit
    )
    name = "small VGG" if ctx.quick else "vgg16"
    keys = ("apply_svf", "thin_svd", "svd_float64", "svd_float32")
    rows.append([f"{name} (all, {big_name} {'x'.join(map(str, big_shape))})", len(weights)])
    rows[-1] += [fmt(seconds.get(k)) for k in keys]
    rows[-1].append(fmt(seconds["apply_svf"] / seconds["svd_float64"]) if "svd_float64" in seconds else "-")


def run(ctx: Context) -> None:
    rows: list = []
    thin_svd(torch.randn(1, 64, 32, device=ctx.device))  # start cuSOLVER/LAPACK before timing anything
    torch.linalg.svd(torch.randn(64, 32, device=ctx.device), full_matrices=False)
    _resnet(ctx, rows)
    if ctx.time_for(10):
        _vgg(ctx, rows)
    else:
        ctx.report.short("VGG16")
    header = ["model", "layers", "apply_svf (s)", "thin_svd (s)", "bare svd float64 (s)", "bare svd float32 (s)"]
    ctx.report.table(f"Decomposition on {ctx.device} (medians)", [*header, "apply / bare float64"], rows)
