"""What a run needs around the model: devices and processes, the lr schedule, seeds, provenance, safe files."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from svftune._io import atomic_write


@dataclass
class Process:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_process(device: str = "auto") -> Process:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group if needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for, but PyTorch sees no CUDA device: use device=cpu")
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return Process(rank, world_size, local_rank, torch_device)


def cleanup_process(process: Process, barrier: bool = True) -> None:
    """Tear the process group down; ``barrier`` (after success) first waits for every rank to be done."""
    if process.distributed and dist.is_initialized():
        if barrier:
            dist.barrier()  # no rank tears gloo/NCCL down while another still talks to it
        dist.destroy_process_group()


@contextlib.contextmanager
def running(device: str) -> Iterator[Process]:
    """``setup_process`` ... ``cleanup_process``; after an error no barrier (the other ranks may never reach it)."""
    process = setup_process(device)
    try:
        yield process
    except BaseException:
        cleanup_process(process, barrier=False)
        raise
    cleanup_process(process)


def lr_factor(schedule: str, iteration: int, total: int, power: float = 0.9) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based) out of ``total``, updated every iteration.

    ``cosine`` decays to 0 at the end (the paper's setting); ``poly`` is ``(1 - t)^power`` (the original
    methods); ``constant`` reproduces the released SVF code, whose scheduler was rebuilt every iteration.
    """
    t = min(max(iteration / max(total, 1), 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "poly":
        return (1.0 - t) ** power
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator's state (Python, NumPy, torch CPU and CUDA), for checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states ``rng_state`` returned (CUDA only where available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_revision() -> str:
    """The checkout's commit (with ``-dirty`` when it has changes), or ``unknown`` outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(seed: int) -> dict[str, Any]:
    """What a result depends on besides its config: versions, code revision, machine, command."""
    import torchvision

    import svf_fss
    import svftune

    return {
        "seed": seed,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "svftune": svftune.__version__,
        "svf_fss": getattr(svf_fss, "__version__", "unknown"),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "host": platform.node(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``svftune._io.atomic_write``: a crash leaves the old file or none."""
    atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` through ``svftune._io.atomic_write``: a crash never leaves half a file."""
    atomic_write(path, text.encode("utf-8"))
