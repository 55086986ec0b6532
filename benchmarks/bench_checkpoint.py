#!/usr/bin/env python
"""Checkpoint size and load speed of svftune on CPU (random-init torchvision ResNet-50, nothing downloaded).

Measures, for ResNet-50 with layers 2-4 adapted (12,544 singular values, 42 convs):

1. ``size``   the checkpoint on disk: single file in float32 and float16, the directory form (config + weights
              + model card), next to what the paper's code saves (the whole model, ``torch.save(model)``) and
              the plain state dict.
2. ``load``   ``load_svf`` onto a fresh base vs the bare SVDs it needs (``thin_svd`` of the 42 folded weights),
              interleaved, medians of wall and CPU time; and, steadier on a shared machine, each load's time over
              the time of the SVDs inside that same load. The issue's target is a ratio <= 1.2.
3. ``cache``  a second load of the same base in a new process with the opt-in decomposition cache
              (``cache_dir=``); times inside that process: imports, building the model, ``load_svf``. Target: the
              ``load_svf`` call <= 0.5 s.

Usage::

    .venv/bin/python benchmarks/bench_checkpoint.py                 # everything, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_checkpoint.py --repeats 1 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import torchvision

import svftune
import svftune.layers
from svftune.decompose import thin_svd

LAYERS = ["layer2", "layer3", "layer4"]


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


def folded_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    weights = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name.split(".")[0] in LAYERS:
            w = module.weight.detach()
            weights.append(w.reshape(module.groups, w.shape[0] // module.groups, -1))
    return weights


def time_svds(model: torch.nn.Module) -> tuple[float, float]:
    """(wall, CPU) seconds of the bare SVDs; CPU time (all threads) is steadier on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    for matrices in folded_weights(model):
        thin_svd(matrices)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_load(path: Path, cache_dir: Path | None = None) -> tuple[float, float, float]:
    """(wall, CPU, wall inside the SVDs) seconds of one load_svf onto a fresh base.

    The third number times the ``thin_svd`` calls the SVF layers make during this very load, so
    ``wall / inside`` is the load's overhead over its own SVDs, measured under the same machine load.
    """
    model = base_model()
    inside = [0.0]

    def timed(matrices):
        start = time.perf_counter()
        try:
            return thin_svd(matrices)
        finally:
            inside[0] += time.perf_counter() - start

    original = svftune.layers.thin_svd
    svftune.layers.thin_svd = timed if cache_dir is None else original
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        svftune.load_svf(model, path, cache_dir=cache_dir)
        return time.perf_counter() - wall, time.process_time() - cpu, inside[0]
    finally:
        svftune.layers.thin_svd = original


def section_size(trained: torch.nn.Module, folder: Path) -> dict:
    sizes = {}
    file32, file16, directory = folder / "r50.safetensors", folder / "r50_fp16.safetensors", folder / "r50_dir"
    svftune.save_svf(trained, file32)
    svftune.save_svf(trained, file16, dtype=torch.float16)
    svftune.save_svf(trained, directory, metadata={"base_model": "torchvision resnet50"})
    sizes["singular_values"] = sum(layer.S.numel() for _, layer in svftune.svf_layers(trained))
    sizes["file_float32_bytes"] = file32.stat().st_size
    sizes["file_float16_bytes"] = file16.stat().st_size
    sizes["directory_bytes"] = sum(p.stat().st_size for p in directory.iterdir())
    sizes["directory_files"] = {p.name: p.stat().st_size for p in sorted(directory.iterdir())}
    merged = svftune.merge_svf(trained)
    whole = io.BytesIO()
    torch.save(merged, whole)  # what the paper's code saves: the whole model object
    state = io.BytesIO()
    torch.save(merged.state_dict(), state)
    sizes["whole_model_bytes"] = len(whole.getvalue())
    sizes["state_dict_bytes"] = len(state.getvalue())
    return sizes


def section_load(path: Path, repeats: int) -> dict:
    svd, load = [], []
    reference = base_model()
    for _ in range(repeats):  # interleaved, so a busy machine slows both alike
        svd.append(time_svds(reference))
        load.append(time_load(path))
    result = {"svd_wall_cpu_s": svd, "load_wall_cpu_s": load}
    for i, clock in enumerate(("wall", "cpu")):
        result[f"svd_median_{clock}_s"] = statistics.median(t[i] for t in svd)
        result[f"load_median_{clock}_s"] = statistics.median(t[i] for t in load)
        result[f"ratio_{clock}"] = result[f"load_median_{clock}_s"] / result[f"svd_median_{clock}_s"]
    result["ratio_per_repeat_cpu"] = [lo[1] / sv[1] for lo, sv in zip(load, svd, strict=True)]
    result["ratio_to_own_svds_per_repeat"] = [wall / inside for wall, _, inside in load]
    return result


def section_cache(path: Path, folder: Path, repeats: int) -> dict:
    cache = folder / "svd_cache"
    first = time_load(path, cache)[0]
    entries = list(cache.rglob("*.safetensors"))
    script = textwrap.dedent(
        f"""
        import json, time
        t0 = time.perf_counter()
        import torch, torchvision, svftune
        t1 = time.perf_counter()
        torch.manual_seed(0)
        model = torchvision.models.resnet50().eval()
        t2, c2 = time.perf_counter(), time.process_time()
        svftune.load_svf(model, {str(path)!r}, cache_dir={str(cache)!r})
        t3, c3 = time.perf_counter(), time.process_time()
        times = {{"import_s": t1 - t0, "build_model_s": t2 - t1, "load_svf_s": t3 - t2, "load_svf_cpu_s": c3 - c2}}
        print(json.dumps(times))
        """
    )
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "first_load_with_cache_s": first,
        "entries": len(entries),
        "cache_bytes": sum(e.stat().st_size for e in entries),
        "second_load_new_process": runs,
        "second_load_svf_median_s": statistics.median(r["load_svf_s"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the load and cache runs")
    parser.add_argument("--sections", nargs="+", default=["size", "load", "cache"], choices=["size", "load", "cache"])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="svftune-bench-") as tmp:
        folder = Path(tmp)
        trained = base_model()
        svftune.apply_svf(trained, layers=LAYERS, progress=False)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in svftune.svf_layers(trained):
                layer.S.mul_(1 + 0.05 * torch.randn(layer.S.shape, generator=generator))
        svftune.save_svf(trained, folder / "r50.safetensors")
        if "size" in args.sections:
            results["size"] = section_size(trained, folder)
            print(json.dumps({"size": results["size"]}, indent=1), flush=True)
        if "load" in args.sections:
            results["load"] = section_load(folder / "r50.safetensors", args.repeats)
            print(json.dumps({"load": results["load"]}, indent=1), flush=True)
        if "cache" in args.sections:
            results["cache"] = section_cache(folder / "r50.safetensors", folder, args.repeats)
            print(json.dumps({"cache": results["cache"]}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
