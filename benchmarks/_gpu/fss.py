"""The FSS trainer: ``svf_fss`` baseline, PFENet and BAM with SVF on the mini data, each through torchrun.

Each method runs ``benchmarks/_gpu/fss_worker.py`` under ``python -m torch.distributed.run --standalone
--nproc_per_node 1`` (NCCL on CUDA, gloo on CPU; DDP, and on CUDA the SyncBatchNorm conversion): a 5-shot
run of two iterations at batch 8 for its peak memory, then a 1-shot run of as many iterations as fit in the
method's share of the time (at most 300) with AMP at 473 px, ending with one evaluation. ``--quick``:
MobileNetV2 at 65 px, batch 2, three iterations. The mini dataset comes from ``--mini-root`` (generated with
``svf_fss.data.mini.make_mini`` when that folder is empty; it needs Fashion-MNIST, which a lent GPU machine
lacks: carry a generated folder there, see benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import Context, fmt, median

METHODS = ("baseline", "pfenet", "bam")
WORKER = Path(__file__).resolve().with_name("fss_worker.py")
MIN_SECONDS = {True: 8.0, False: 45.0}  # quick / full: a method gets at least this much, or is skipped


def mini_root(ctx: Context) -> Path:
    root = Path(ctx.mini_root or ctx.scratch / "mini-data")
    if not (root / "lists" / "train.txt").is_file():
        from svf_fss.data.errors import DataError
        from svf_fss.data.mini import make_mini

        tic = time.time()
        try:
            make_mini(root)
        except DataError as err:
            raise DataError(
                f"no mini dataset in {root} and it cannot be generated here ({err}); generate it where Fashion-MNIST "
                "is installed (svf-fss make-mini runs/gpu-mini), carry that folder and pass --mini-root runs/gpu-mini "
                "(benchmarks/README.md, 'GPU check on a lent device')"
            ) from None
        ctx.report.note(f"generated the mini dataset in {root} ({time.time() - tic:.0f} s)")
    return root


def _run_method(ctx: Context, method: str, root: Path, seconds: float) -> dict | None:
    out = ctx.scratch / f"{method}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(WORKER)]
    command += ["--method", method, "--mini-root", str(root), "--run-dir", str(ctx.scratch / method)]
    command += ["--out", str(out), "--device", str(ctx.device), "--seconds", f"{seconds:.1f}"]
    command += ["--quick"] if ctx.quick else []
    env = dict(os.environ)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only (one process, no network needed)
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    tic = time.time()
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False)
        rc, tail = result.returncode, (result.stdout + result.stderr)[-2500:]
    except subprocess.TimeoutExpired as err:
        rc, tail = "timeout", str(err.stdout or "")[-1500:] + str(err.stderr or "")[-1000:]
    ctx.report.metric(f"{method}.wall_seconds", time.time() - tic)
    record = json.loads(out.read_text()) if out.is_file() else None
    ok = rc == 0 and record is not None and "one_shot" in record
    ctx.report.check(f"{method}: torchrun run finished", ok, rc, 0, "" if ok else tail[-1200:])
    if not ok:
        print(tail, file=sys.stderr)
    return record


def _checks(ctx: Context, method: str, record: dict) -> list:
    report = ctx.report
    one, five = record["one_shot"], record["five_shot"]
    if record.get("workers_fallback"):
        report.note(f"{method}: {record['workers_fallback']}")
    report.check(
        f"{method}: DDP wrapped the model ({record['backend']}, world {record['world_size']})", record["ddp_wraps"] >= 2
    )
    if ctx.cuda:
        converted = record["sync_batchnorm_modules"]
        report.check(f"{method}: SyncBatchNorm conversion ran", bool(converted) and min(converted) > 0, converted)
    losses = one["losses"]
    finite = all(math.isfinite(v) for v in losses + five["losses"])
    report.check(f"{method}: losses finite", finite, len(losses))
    quarter = max(len(losses) // 4, 1)
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    if ctx.quick:
        report.note(f"{method}: {len(losses)} iterations only (--quick): the loss trend is not checked")
    else:
        report.check(f"{method}: loss goes down (mean of the last vs the first quarter)", last < first, [first, last])
    ev = one["eval"]
    good = all(isinstance(ev.get(k), float) and 0.0 <= ev[k] <= 1.0 for k in ("miou", "fb_iou"))
    report.check(
        f"{method}: final evaluation gives mIoU and FB-IoU in [0, 1]", good, [ev.get("miou"), ev.get("fb_iou")]
    )
    report.metric(
        method,
        {
            "iterations": one["iterations"],
            "iterations_per_s": one["iterations_per_s"],
            "episodes_per_s": one["episodes_per_s"],
            "images_per_s": one["images_per_s"],
            "peak_gib_1shot": one["peak_gib"],
            "peak_gib_5shot": five["peak_gib"],
            "five_shot_step_s": five["step_seconds"],
            "loss_first_quarter": first,
            "loss_last_quarter": last,
            "miou": ev.get("miou"),
            "fb_iou": ev.get("fb_iou"),
            "eval_seconds": ev.get("seconds"),
            "train_seconds": one["seconds"],
            "median_loss": median(losses),
        },
    )
    settings = record["settings"]
    return [
        method,
        settings["amp"],
        f"{settings['backbone']} {settings['crop']} px, batch {settings['batch_size']}",
        one["iterations"],
        fmt(one["iterations_per_s"]),
        fmt(one["images_per_s"]),
        fmt(one["peak_gib"]) if one["peak_gib"] is not None else "-",
        fmt(five["peak_gib"]) if five["peak_gib"] is not None else "-",
        f"{first:.3f} -> {last:.3f}",
        f"{100 * ev['miou']:.1f} / {100 * ev['fb_iou']:.1f}" if good else "-",
    ]


def run(ctx: Context) -> None:
    if ctx.cuda and not torch.distributed.is_nccl_available():
        ctx.report.check("NCCL is available in this torch build", False)
        return
    if not ctx.cuda:
        ctx.report.note("no CUDA: torchrun runs on gloo and the SyncBatchNorm conversion (CUDA only) is not made")
    root = mini_root(ctx)
    rows = []
    for index, method in enumerate(METHODS):
        seconds = ctx.left() / (len(METHODS) - index) - 5
        if seconds < MIN_SECONDS[ctx.quick]:
            ctx.report.short(f"{method} ({seconds:.0f} s left for it)")
            continue
        record = _run_method(ctx, method, root, seconds)
        if record and "one_shot" in record:
            rows.append(_checks(ctx, method, record))
    header = ["method", "amp", "setting", "iterations", "it/s", "images/s", "peak 1-shot (GiB)", "peak 5-shot (GiB)"]
    ctx.report.table("svf_fss training under torchrun (1 process)", [*header, "loss", "mIoU / FB-IoU %"], rows)
