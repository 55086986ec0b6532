"""Forward + backward time (and GPU peak memory) per episode batch: frozen vs SVF vs full fine-tuning.

CPU, small (what the README records)::

    .venv/bin/python examples/fss/benchmarks/bench_models.py --size 193 --batch 2 --threads 2

GPU at the paper's size (batch 8, 473 px, 1-shot), with mixed precision and/or activation checkpointing::

    python examples/fss/benchmarks/bench_models.py --device cuda --size 473 --batch 8 --amp
    python examples/fss/benchmarks/bench_models.py --device cuda --size 473 --batch 8 --checkpoint

Without a GPU, ``--saved-memory`` measures instead what decides GPU memory: one training forward with a
``torch.autograd.graph.saved_tensors_hooks`` that adds up the distinct storages autograd keeps for the backward
(activations; parameters excluded), plus the parameters and their gradients. Activations grow linearly with the
batch, so batch 1 at 473 px on a CPU estimates batch 8 on a GPU::

    .venv/bin/python examples/fss/benchmarks/bench_models.py --size 473 --batch 1 --saved-memory --threads 1

Random weights (timing does not depend on them) unless ``--weights`` is given. Each strategy is measured in a
fresh model: ``--warmup`` untimed steps, then ``--iters`` timed steps of zero_grad + forward + backward; the
median and the minimum are reported. On CUDA the peak memory is ``torch.cuda.max_memory_allocated`` over the timed
steps (the model, its gradients and every activation; no optimizer state).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from svf_fss.models import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="baseline", choices=("baseline", "pfenet", "bam"))
    parser.add_argument("--backbone", default="resnet50_v2")
    parser.add_argument("--strategies", default="frozen,svf,full", help="comma-separated strategy strings")
    parser.add_argument("--size", type=int, default=193, help="square crop size (paper: 473 Pascal, 641 COCO)")
    parser.add_argument("--batch", type=int, default=2, help="episodes per batch (paper: 8)")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="torch.autocast with --amp-dtype")
    parser.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing of backbone stages")
    parser.add_argument("--form", default="auto", help="svftune training form for SVF strategies")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--weights", default=None, help="optional backbone weights file")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--saved-memory", action="store_true", help="measure activation memory kept for the backward (no timing)"
    )
    return parser.parse_args(argv)


def synthetic_batch(args: argparse.Namespace, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    size, batch, shots = args.size, args.batch, args.shots
    query = torch.randn(batch, 3, size, size, generator=generator)
    supports = torch.randn(batch, shots, 3, size, size, generator=generator)
    support_masks = torch.zeros(batch, shots, size, size, dtype=torch.long)
    support_masks[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    query_mask = (torch.rand(batch, size, size, generator=generator) > 0.5).long()
    base_label = torch.randint(0, 16, (batch, size, size), generator=generator)
    episode_class = torch.randint(1, 16, (batch,), generator=generator)
    tensors = (query, supports, support_masks, query_mask, base_label, episode_class)
    return tuple(t.to(device) for t in tensors)


def saved_activation_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of distinct non-parameter storages autograd saves for the backward while ``run()`` executes."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, strategy: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(
        args.method,
        args.backbone,
        args.shots,
        strategy,
        weights=args.weights,
        checkpoint_backbone=args.checkpoint,
        svf_form=args.form,
    )
    build_seconds = time.perf_counter() - start
    model.to(device).train()
    trainable = sum(p.numel() for group in model.param_groups() for p in group["params"])
    backbone_trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    query, supports, support_masks, query_mask, base_label, episode_class = synthetic_batch(args, device)
    dtype = getattr(torch, args.amp_dtype)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
            out = model(query, supports, support_masks, query_mask, base_label=base_label, episode_class=episode_class)
        out["loss"].backward()
        return out["loss"].item()

    if args.saved_memory:
        model.zero_grad(set_to_none=True)

        def forward() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
                model(query, supports, support_masks, query_mask, base_label=base_label, episode_class=episode_class)

        saved = saved_activation_bytes(model, forward)
        trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return {
            "strategy": strategy,
            "trainable": trainable,
            "backbone_trainable": backbone_trainable,
            "saved_gib": saved / 2**30,
            "weights_and_grads_gib": (weights + buffers + trained) / 2**30,
        }
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.iters):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    result = {
        "strategy": strategy,
        "trainable": trainable,
        "backbone_trainable": backbone_trainable,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "build_s": build_seconds,
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure every strategy in turn (a fresh model each) and print a markdown table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"# {args.method} / {args.backbone} / {args.shots}-shot / batch {args.batch} / {args.size} px / "
        f"{device} ({machine}, {torch.get_num_threads()} threads) / amp={args.amp and args.amp_dtype} / "
        f"checkpoint={args.checkpoint} / torch {torch.__version__}"
    )
    if args.saved_memory:
        print("| strategy | trainable (backbone) | saved activations GiB | weights + grads GiB |")
        print("| --- | --- | --- | --- |")
    else:
        print("| strategy | trainable (backbone) | fwd+bwd median s | min s | peak GiB |")
        print("| --- | --- | --- | --- | --- |")
    results = []
    for strategy in args.strategies.split(","):
        result = measure(args, strategy.strip(), device)
        results.append(result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.saved_memory:
            print(
                f"| {result['strategy']} | {result['trainable']:,} ({result['backbone_trainable']:,}) | "
                f"{result['saved_gib']:.3f} | {result['weights_and_grads_gib']:.3f} |",
                flush=True,
            )
            continue
        peak = f"{result['peak_gib']:.2f}" if "peak_gib" in result else "n/a"
        print(
            f"| {result['strategy']} | {result['trainable']:,} ({result['backbone_trainable']:,}) | "
            f"{result['median_s']:.3f} | {result['min_s']:.3f} | {peak} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "machine": machine, "results": results}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
