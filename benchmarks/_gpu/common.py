"""What every gpu_check section shares: its context and report, precision modes, timing, memory, small models."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
#: precision modes: (autocast dtype or None, TF32 for matmuls and cuDNN convs)
MODES = {
    "fp32": (None, False),
    "tf32": (None, True),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
}
CUDA_ONLY_MODES = ("tf32", "fp16")  # TF32 does not exist on CPU; CPU fp16 autocast covers few conv kernels


def _plain(value: Any) -> Any:
    """JSON-able copy: tensors and numpy scalars become numbers, NaN/Inf become strings (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
        return _plain(value)
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Report:
    """A section's checks, metrics, tables and notes, saved to ``path`` (JSON) after every record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "checks": [],
            "metrics": {},
            "tables": [],
            "notes": [],
            "skip": None,
            "partial": [],
        }

    def check(self, name: str, ok: bool, value: Any = None, limit: Any = None, detail: str = "") -> bool:
        """Record a pass/fail check (``value`` against ``limit``); returns ``ok``."""
        self.data["checks"].append(
            {"name": name, "ok": bool(ok), "value": _plain(value), "limit": _plain(limit), "detail": detail}
        )
        self.save()
        return bool(ok)

    def metric(self, key: str, value: Any) -> None:
        """Record a measured number (or a small structure of numbers) under ``key``."""
        self.data["metrics"][key] = _plain(value)
        self.save()

    def table(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        """A Markdown table for the report."""
        self.data["tables"].append({"title": title, "header": header, "rows": _plain(rows)})
        self.save()

    def note(self, text: str) -> None:
        """A sentence for the report (what was left out, and why)."""
        self.data["notes"].append(text)
        self.save()

    def short(self, what: str) -> None:
        """Record a part left out for lack of time (the section then counts as partial)."""
        self.data["partial"].append(what)
        self.note(f"{what}: skipped, section time used up")

    def skip(self, reason: str) -> None:
        """Mark the whole section as skipped, with the reason."""
        self.data["skip"] = reason
        self.save()

    def save(self) -> None:
        from svftune._io import atomic_write_text

        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")


@dataclass
class Context:
    """Where and how a section runs; ``deadline`` is a ``time.time()`` the section sizes its loops to."""

    device: torch.device
    quick: bool
    deadline: float
    scratch: Path
    report: Report
    mini_root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.time()

    def time_for(self, cuda_seconds: float) -> bool:
        """Whether ``cuda_seconds`` are left (a fifth of that with ``--quick``, whose sizes are tiny)."""
        return self.left() >= (cuda_seconds / 5 if self.quick else cuda_seconds)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def modes(self) -> list[str]:
        """The precision modes this device runs (the others are reported as not applicable)."""
        return [m for m in MODES if self.cuda or m not in CUDA_ONLY_MODES]


# ------------------------------------------------------------------------------------------- precision
@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for float32 matmuls and cuDNN convolutions on or off, restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; both APIs exist in 2.1 .. 2.14
        before = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.allow_tf32, cudnn.allow_tf32 = before


@contextlib.contextmanager
def precision(mode: str, device: torch.device) -> Iterator[None]:
    """Run in ``mode`` (a key of ``MODES``): autocast to bf16/fp16, or float32 with TF32 on or off."""
    dtype, use_tf32 = MODES[mode]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with tf32(use_tf32), autocast:
        yield


def tf32_flags() -> dict[str, bool]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }


# ------------------------------------------------------------------------------------------- numbers
def rel_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (inf when ``actual`` is not finite)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return math.inf
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def norm_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (inf when ``actual`` is not finite)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return math.inf
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a Markdown cell (``-`` for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------- timing
def time_calls(
    fns: dict[str, Callable[[], object]], ctx: Context, warmup: int, repeats: int, seconds: float
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` rounds, then up to ``repeats`` interleaved rounds (order
    rotating) that stop early once ``seconds`` have passed or the section's deadline is near. CUDA: events."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    ctx.sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    stop = time.time() + seconds
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if ctx.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1000.0)
            else:
                tic = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - tic)
        if time.time() > stop or not ctx.time_for(5):
            break
    return times


def timed(fn: Callable[[], object], ctx: Context) -> float:
    """Wall seconds of one call, the device synchronised before and after."""
    ctx.sync()
    tic = time.perf_counter()
    fn()
    ctx.sync()
    return time.perf_counter() - tic


def peak_memory(fn: Callable[[], object], ctx: Context) -> dict[str, float] | None:
    """CUDA memory of one call: ``max_memory_allocated`` during it and what was allocated before (GiB)."""
    if not ctx.cuda:
        return None
    ctx.sync()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    before = torch.cuda.memory_allocated(ctx.device)
    fn()
    ctx.sync()
    peak = torch.cuda.max_memory_allocated(ctx.device)
    gib = 2.0**30
    return {"peak_gib": peak / gib, "before_gib": before / gib, "step_gib": (peak - before) / gib}


# ------------------------------------------------------------------------------------------- models
def calibrate_bn(model: nn.Module, x: Tensor, passes: int = 2) -> nn.Module:
    """Give BatchNorm layers the running statistics of ``x`` (so activations keep a sane scale), then eval."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def resnet_backbone(quick: bool) -> nn.Module:
    """svf_fss's dilated ResNet-50 (output stride 8); ``quick``: the same layout with one bottleneck per stage
    and a quarter of the inner width (the stage outputs keep ResNet-50's 256 .. 2048 channels)."""
    from svf_fss.models.backbones import Backbone, build_backbone, dilate_resnet_stage
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    if not quick:
        return build_backbone("resnet50")
    net = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=16)
    dilate_resnet_stage(net.layer3, 2)
    dilate_resnet_stage(net.layer4, 4)
    stages = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2, net.layer3, net.layer4]
    return Backbone("resnet_tiny", stages, (64, 256, 512, 1024, 2048), 8)


def last_output(out: Any) -> Tensor:
    """A model's output tensor (a Backbone returns its five stage outputs: take the last)."""
    return out[-1] if isinstance(out, list | tuple) else out


RESNET_LAYERS = ["layer2", "layer3", "layer4"]
