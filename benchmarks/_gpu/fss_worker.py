"""One svf_fss training run under torchrun, for gpu_check's ``fss`` section (one process per method).

    python -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/_gpu/fss_worker.py \
        --method baseline --mini-root MINI --run-dir DIR --out result.json --seconds 60 [--quick]

It starts the process group itself (NCCL on CUDA, gloo on CPU) and hands ``svf_fss.train.engine.train`` a
``Process`` that counts as distributed with a world of one: ``svf-fss train`` under torchrun with one process
would otherwise skip DDP and the SyncBatchNorm conversion (``Process.distributed`` is ``world_size > 1``), which
this run is meant to exercise. It records each optimisation step (time, loss) by wrapping the engine's
``_step``, and whether the engine converted to SyncBatchNorm and wrapped the model in DDP.

First a 5-shot run of two iterations at the run's batch size (its peak memory, and a step time that sizes the
main run), then the 1-shot run: as many iterations as fit in ``--seconds`` (at most ``MAX_ITERATIONS``) with AMP,
and one evaluation at the end. Writes ``--out`` (JSON) from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

MAX_ITERATIONS = 300
MIN_ITERATIONS = 20
#: CUDA: fp16 (with the GradScaler) for two methods, bf16 for the third, so both AMP paths run
AMP = {
    "cuda": {"baseline": "fp16", "pfenet": "bf16", "bam": "fp16"},
    "cpu": {"baseline": "none", "pfenet": "bf16", "bam": "none"},
}


def settings(method: str, device: torch.device, mini_root: str, quick: bool) -> dict:
    values = {
        "dataset": "mini",
        "data_root": mini_root,
        "method": method,
        "strategy": "svf",
        "fold": 0,
        "epochs": 1000,  # max_iterations ends the run
        "val_every": 10**6,  # one evaluation, when training ends
        "test_seeds": [321],
        "resume": False,
        "progress": False,
        "tensorboard": False,
        "device": str(device),
        "amp": AMP[device.type][method],
    }
    if quick:
        values.update(backbone="mobilenet_v2", crop=65, test_size=65, batch_size=2, workers=0, val_episodes=4)
    else:
        workers = max(1, min(8, (os.cpu_count() or 2) - 2))
        values.update(backbone="resnet50_v2", crop=473, batch_size=8, workers=workers, val_episodes=100)
    return values


class Recorder:
    """Wraps the engine's step, SyncBatchNorm conversion and DDP constructor to see what training did."""

    def __init__(self, engine) -> None:
        self.steps: list[tuple[float, float]] = []
        self.sync_bn: list[int] = []
        self.ddp = 0
        step, sync, ddp = engine._step, engine._sync_batchnorm, engine.DistributedDataParallel

        def recording_step(*args, **kwargs):
            loss = step(*args, **kwargs)
            self.steps.append((time.perf_counter(), float(loss)))
            return loss

        def recording_sync(model: nn.Module) -> nn.Module:
            model = sync(model)
            self.sync_bn.append(sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()))
            return model

        def recording_ddp(*args, **kwargs):
            self.ddp += 1
            return ddp(*args, **kwargs)

        engine._step, engine._sync_batchnorm, engine.DistributedDataParallel = (
            recording_step,
            recording_sync,
            recording_ddp,
        )


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--method", "--mini-root", "--run-dir", "--out", "--device"):
        parser.add_argument(name, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    start = time.time()
    from svf_fss.train import engine
    from svf_fss.train.config import load_config
    from svf_fss.train.runtime import Process

    class GroupProcess(Process):
        @property
        def distributed(self) -> bool:
            return dist.is_initialized()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if args.device.startswith("cuda") else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    process = GroupProcess(dist.get_rank(), dist.get_world_size(), local_rank, device)
    recorder = Recorder(engine)
    values = settings(args.method, device, args.mini_root, args.quick)
    record = {"method": args.method, "backend": backend, "world_size": process.world_size, "settings": values}
    run_dir = Path(args.run_dir)
    try:
        tic = time.perf_counter()
        _reset(device)
        five_values = {**values, "shots": 5, "max_iterations": 2, "val_episodes": 1, "output": str(run_dir / "5shot")}
        try:
            engine.train(load_config(None, five_values), process)
        except RuntimeError as err:  # e.g. a small /dev/shm in a VM: DataLoader workers die; retry without them
            if "DataLoader" not in str(err) or values["workers"] == 0:
                raise
            record["workers_fallback"] = f"workers={values['workers']} failed ({str(err)[:200]}); reran with 0"
            values["workers"] = five_values["workers"] = 0
            recorder.steps.clear()
            engine.train(load_config(None, {**five_values, "output": str(run_dir / "5shot-retry")}), process)
        wall5 = time.perf_counter() - tic
        record["five_shot"] = {"peak_gib": _peak(device), "seconds": wall5, "losses": [s[1] for s in recorder.steps]}
        step_s = recorder.steps[-1][0] - recorder.steps[-2][0]
        overhead = wall5 - 2 * step_s
        record["five_shot"]["step_seconds"] = step_s
        recorder.steps.clear()

        left = args.seconds - (time.time() - start)
        eval_s = 0.1 * values["val_episodes"] if device.type == "cuda" else 0.5 * values["val_episodes"]
        iterations = int((left - overhead - eval_s - 10) / max(step_s, 1e-3))
        iterations = 3 if args.quick else max(MIN_ITERATIONS, min(MAX_ITERATIONS, iterations))
        one = load_config(None, {**values, "shots": 1, "max_iterations": iterations, "output": str(run_dir / "1shot")})
        _reset(device)
        tic = time.perf_counter()
        summary = engine.train(one, process)
        times, losses = [s[0] for s in recorder.steps], [s[1] for s in recorder.steps]
        warm = min(5, max(len(times) - 2, 0))
        rate = (len(times) - 1 - warm) / (times[-1] - times[warm]) if len(times) - 1 > warm else None
        record["one_shot"] = {
            "iterations": summary["iterations"],
            "peak_gib": _peak(device),
            "seconds": time.perf_counter() - tic,
            "iterations_per_s": rate,
            "episodes_per_s": rate * one.batch_size if rate else None,
            "images_per_s": rate * one.batch_size * (1 + one.shots) if rate else None,
            "losses": losses,
            "eval": summary["last"],
            "trainable": summary["trainable"],
        }
        record["sync_batchnorm_modules"] = recorder.sync_bn
        record["ddp_wraps"] = recorder.ddp
    finally:
        if process.rank == 0:
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
