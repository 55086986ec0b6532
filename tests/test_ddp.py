"""SVF under DistributedDataParallel: two CPU processes (gloo on 127.0.0.1), different data per rank.

After three SGD steps the singular values must be bit-identical on both ranks and match, within ``RTOL`` relative
(fp32; summation order differs), a single process trained on the concatenated batches with a mean-reduced loss
(DDP averages gradients, so equal per-rank batches give the gradient of the mean over the whole batch).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from toys import randomize_norm_stats, relative_error

import svftune

RTOL = 1e-6
WORLD_SIZE = 2
STEPS = 3
BATCH_PER_RANK = 4
LR = 0.1


def _build_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    randomize_norm_stats(model, seed=1)
    return svftune.apply_svf(model)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH_PER_RANK, 3, 12, 12, generator=generator)
    return x, torch.randint(0, 5, (BATCH_PER_RANK,), generator=generator)


def _singular_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.S.detach().clone() for name, layer in svftune.svf_layers(model)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = _build_model().train()
        ddp = nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True, the default
        optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LR)
        losses = []
        for step in range(STEPS):
            x, y = _batch(step, rank)
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        torch.save({"S": _singular_values(model), "losses": losses}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it (that aborted a CI run)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_matches_single_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    assert results[0]["losses"] != results[1]["losses"], "the ranks must have trained on different data"
    assert results[0]["S"].keys() == results[1]["S"].keys()
    for name, value in results[0]["S"].items():
        assert torch.equal(value, results[1]["S"][name]), f"{name}: S differs between ranks"

    reference = _build_model().train()
    initial = _singular_values(reference)
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        batches = [_batch(step, rank) for rank in range(WORLD_SIZE)]
        x, y = (torch.cat(parts) for parts in zip(*batches, strict=True))
        loss = F.cross_entropy(reference(x), y)  # mean over the concatenated batch
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = _singular_values(reference)
    assert expected.keys() == results[0]["S"].keys()
    for name, value in expected.items():
        assert not torch.equal(value, initial[name]), f"{name}: S did not train"
        error = relative_error(results[0]["S"][name] - initial[name], value - initial[name])
        assert error <= 1e-4, f"{name}: DDP update differs from the single-process update by {error:.2e}"
        error = relative_error(results[0]["S"][name], value)
        assert error <= RTOL, f"{name}: DDP S differs from the single-process S by {error:.2e} relative"


def test_ddp_broadcasts_only_small_buffers():
    # DDP broadcasts every buffer from rank 0 before each forward (broadcast_buffers=True): the frozen factors U and
    # Vh must not be buffers, or each step would ship a copy of the whole backbone. Buffers: S0 and BN statistics.
    model = _build_model()
    buffer_names = [name for name, _ in model.named_buffers()]
    assert all(name.endswith((".S0", ".running_mean", ".running_var", ".num_batches_tracked")) for name in buffer_names)
    buffer_numel = sum(b.numel() for b in model.buffers())
    factor_numel = sum(layer.U.numel() + layer.Vh.numel() for _, layer in svftune.svf_layers(model))
    assert buffer_numel < factor_numel / 10, f"buffers hold {buffer_numel} elements, U and Vh {factor_numel}"
