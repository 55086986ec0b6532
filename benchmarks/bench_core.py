#!/usr/bin/env python
"""Core speed and memory benchmarks of svftune on CPU (random-init torchvision models, nothing downloaded).

Sections (``--sections``, default all):

1. ``r224``   ResNet-50, layers 2-4 adapted, batch 4, 224 px: one training step per variant.
2. ``r473``   ResNet-50 with output stride 8 (dilated layers 3-4), batch 1, 473 px: same variants.
3. ``vit``    ViT-B/16 encoder (12 blocks, 197 tokens), every Linear adapted: same variants.
4. ``memory`` Peak RSS of one training step (SGD momentum), each variant in its own subprocess.
5. ``eval``   no_grad eval forward: plain vs unmerged SVF vs merged model.
6. ``apply``  apply_svf vs the bare SVDs it needs (ResNet-50 layers 2-4), and whole VGG16 vs a plain SVD.
7. ``layers`` Per-layer forward+backward of three_op vs rebuilt vs direct for every ResNet-50 layer shape.

A training step is forward, ``loss = logits.square().mean()``, backward, ``SGD(lr=1e-4, momentum=0.9).step()``
(left out with ``--no-optimizer``) and ``zero_grad(set_to_none=True)``. The variants are ``auto``,
``three_op``, ``rebuilt`` and ``lean`` (the model is decomposed once with ``apply_svf``; the forced forms are
copies with ``form`` set on every SVF layer, which is all ``apply_svf(..., form=...)`` does differently) and
``direct`` (the plain model
with the same weights trainable, everything else frozen, BatchNorm frozen with ``svftune.freeze_batchnorm``).
Variants live side by side in one process and are interleaved (the order rotates every repeat) after warm-up;
the tables report medians and minima.

Usage::

    .venv/bin/python benchmarks/bench_core.py --quick                # smoke run (small inputs), a few minutes
    .venv/bin/python benchmarks/bench_core.py --json out.json        # full run, 10-25 minutes on 2 cores
    .venv/bin/python benchmarks/bench_core.py --sections r224 vit --repeats 15
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import svftune
from svftune.decompose import thin_svd
from svftune.matching import select_layers

RESNET_LAYERS = ["layer2", "layer3", "layer4"]
VARIANTS = ("auto", "three_op", "rebuilt", "lean", "direct")
SECTIONS = ("r224", "r473", "vit", "memory", "eval", "apply", "layers")
# name -> (image size, batch, output stride 8)
RESNET_SETTINGS = {"r224": (224, 4, False), "r473": (473, 1, True)}
VIT_BATCH = 2
#: --quick: smaller inputs, so that a smoke run of every section takes a few minutes
QUICK_RESNET_SETTINGS = {"r224": (112, 2, False), "r473": (161, 1, True)}
QUICK_VIT_BATCH = 1


def use_quick_settings() -> None:
    global VIT_BATCH
    RESNET_SETTINGS.update(QUICK_RESNET_SETTINGS)
    VIT_BATCH = QUICK_VIT_BATCH


# --------------------------------------------------------------------------------------------- helpers
def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict:
    model_name = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "svftune": svftune.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": load(),
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function: warm-up rounds, then ``repeats`` rounds in rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, limit: float) -> str:
    return "PASS" if value <= limit else "FAIL"


# --------------------------------------------------------------------------------------------- models
def plain_resnet(setting: str) -> nn.Module:
    _, _, os8 = RESNET_SETTINGS[setting]
    torch.manual_seed(0)
    return torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True] if os8 else None)


def plain_vit_encoder() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vit_b_16().encoder


def make_variant(plain: nn.Module, variant: str, layers) -> nn.Module:
    """A copy of ``plain`` prepared for one training variant."""
    model = copy.deepcopy(plain)
    if variant == "direct":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for _, module in select_layers(model, layers):
            module.weight.requires_grad_(True)
        svftune.freeze_batchnorm(model)
    else:
        svftune.apply_svf(model, layers, form=variant, progress=False)
    return model.train()


def set_form(model: nn.Module, form: str) -> nn.Module:
    """Force ``form`` on every SVF layer: all that ``apply_svf(..., form=form)`` does differently."""
    for _, layer in svftune.svf_layers(model):
        layer.form = form
    model.svf_config.form = form
    return model


def make_variants(plain: nn.Module, variants, layers) -> dict[str, nn.Module]:
    """Every variant, decomposing once: the forced-form models are copies of the ``auto`` one."""
    svf = make_variant(plain, "auto", layers) if any(v != "direct" for v in variants) else None
    models = {}
    for variant in variants:
        if variant == "direct":
            models[variant] = make_variant(plain, "direct", layers)
        else:
            models[variant] = set_form(copy.deepcopy(svf), variant)
    return models


#: whether timed training steps include ``SGD(momentum=0.9).step()`` (``--no-optimizer`` turns it off; the
#: memory section always includes it)
TIME_OPTIMIZER = True


def train_step_fn(model: nn.Module, x: torch.Tensor, optimizer_step: bool = True) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = model(x).float().square().mean()
        loss.backward()
        if optimizer_step:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_training(section: str, variants=VARIANTS) -> tuple[dict[str, nn.Module], torch.Tensor, dict]:
    if section == "vit":
        plain, layers = plain_vit_encoder(), None
        batch = VIT_BATCH
        torch.manual_seed(1)
        x = torch.randn(batch, 197, 768)
        info = {"model": "torchvision vit_b_16().encoder, 12 blocks", "batch": batch, "tokens": 197}
    else:
        size, batch, os8 = RESNET_SETTINGS[section]
        plain, layers = plain_resnet(section), RESNET_LAYERS
        torch.manual_seed(1)
        x = torch.randn(batch, 3, size, size)
        info = {"model": "resnet50" + (" output stride 8" if os8 else ""), "batch": batch, "size": size}
    models = make_variants(plain, variants, layers)
    info["adapted_layers"] = len(svftune.svf_layers(models.get("auto", next(iter(models.values())))))
    info["trainable"] = {v: svftune.trainable_parameters(m)[0] for v, m in models.items()}
    return models, x, info


# --------------------------------------------------------------------------------------------- sections 1-3
def bench_training(section: str, warmup: int, repeats: int) -> dict:
    models, x, info = build_training(section)
    # which form auto runs for each adapted layer (layers read through ``.weight``, like the out_proj of
    # nn.MultiheadAttention, never call the SVF forward: they always use the rebuilt weight)
    records = layer_records(models["auto"], x)
    called = {r["name"] for r in records}
    info["auto_choices"] = {
        "three_op": sum(r["auto_three_op"] for r in records),
        "rebuilt": sum(not r["auto_three_op"] for r in records),
        "via .weight (rebuilt)": sum(name not in called for name, _ in svftune.svf_layers(models["auto"])),
    }
    steps = {name: train_step_fn(model, x, TIME_OPTIMIZER) for name, model in models.items()}
    info["optimizer_step"] = TIME_OPTIMIZER
    info["load_before"] = load()
    times = interleaved(steps, warmup, repeats)
    info["load_after"] = load()
    info["seconds"] = times
    info["median"] = {k: median(v) for k, v in times.items()}
    info["min"] = {k: min(v) for k, v in times.items()}
    return info


def training_table(name: str, result: dict) -> str:
    med, low = result["median"], result["min"]
    rows = []
    for variant in VARIANTS:
        rows.append(
            [
                variant,
                f"{med[variant]:.3f}",
                f"{low[variant]:.3f}",
                f"{med[variant] / med['direct']:.2f}x",
                f"{med[variant] / med['three_op']:.2f}x",
                f"{low[variant] / low['direct']:.2f}x",
                f"{low[variant] / low['three_op']:.2f}x",
                f"{result['trainable'][variant]:,d}",
            ]
        )
    header = ["variant", "median s/step", "min s/step", "vs direct", "vs three_op", "min vs direct"]
    header += ["min vs three_op", "trainable params"]
    size = f"{result['size']} px" if "size" in result else f"{result['tokens']} tokens"
    title = f"**{name}**: {result['model']}, batch {result['batch']}, {size}, {result['adapted_layers']} layers"
    title += f" adapted, {len(result['seconds']['auto'])} repeats, load {result['load_before']} -> "
    title += (
        f"{result['load_after']}; {'with' if result['optimizer_step'] else 'WITHOUT'} the SGD step; auto runs "
        + ", ".join(f"{k}: {v}" for k, v in result["auto_choices"].items())
    )
    return title + "\n\n" + md_table(header, rows)


def training_targets(name: str, result: dict) -> list[list[str]]:
    med, low = result["median"], result["min"]
    rows = []
    if name == "vit":
        ratio = med["auto"] / min(med["three_op"], med["rebuilt"])
        ratio_min = low["auto"] / min(low["three_op"], low["rebuilt"])
        rows.append(
            [name, "auto <= min(three_op, rebuilt)", f"{ratio:.3f}x (min {ratio_min:.3f}x)", verdict(ratio, 1.0)]
        )
    else:
        ratio, ratio_min = med["auto"] / med["direct"], low["auto"] / low["direct"]
        rows.append([name, "auto <= 0.9x direct", f"{ratio:.3f}x (min {ratio_min:.3f}x)", verdict(ratio, 0.9)])
        ratio, ratio_min = med["auto"] / med["three_op"], low["auto"] / low["three_op"]
        rows.append([name, "auto <= 1.0x three_op", f"{ratio:.3f}x (min {ratio_min:.3f}x)", verdict(ratio, 1.0)])
        ratio, ratio_min = med["lean"] / med["direct"], low["lean"] / low["direct"]
        rows.append([name, "lean vs direct (info)", f"{ratio:.3f}x (min {ratio_min:.3f}x)", "-"])
    return rows


# --------------------------------------------------------------------------------------------- section 4
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_worker(section: str, variant: str, svf_path: str) -> dict:
    """Runs in its own process: RSS before and peak RSS during one training step (+ a second one).

    SVF variants load the model the parent decomposed once (``torch.save`` of the whole module), so the
    worker's RSS holds exactly the model's tensors, not the SVD's temporaries.
    """
    torch.manual_seed(1)
    size, batch, _ = RESNET_SETTINGS[section]
    x = torch.randn(batch, 3, size, size)
    _trim()
    rss_empty = _rss_kib("VmRSS")
    if variant == "direct":
        model = make_variant(plain_resnet(section), variant, RESNET_LAYERS)
    else:
        model = set_form(torch.load(svf_path, weights_only=False), variant).train()
    step = train_step_fn(model, x)
    _trim()
    rss_model = _rss_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = _reset_peak()
    step()
    peak1 = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _trim()
    rss_after1 = _rss_kib("VmRSS")
    exact = exact and _reset_peak()
    step()
    peak2 = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "exact_peak": exact,
        "model_mib": (rss_model - rss_empty) / 1024,
        "step1_peak_mib": (peak1 - rss_model) / 1024,
        "step2_peak_mib": (peak2 - rss_after1) / 1024,
        "kept_after_step_mib": (rss_after1 - rss_model) / 1024,
        "process_peak_mib": max(peak1, peak2) / 1024,
        "ru_maxrss_delta_mib": (maxrss_after - maxrss_before) / 1024,
    }


def bench_memory(sections: list[str], quick: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = {}
    for section in sections:
        results[section] = {}
        svf_path = os.path.join(tempfile.mkdtemp(prefix="svf_bench_"), "model.pt")
        torch.save(make_variant(plain_resnet(section), "auto", RESNET_LAYERS), svf_path)
        for variant in VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", section, variant, svf_path]
            cmd += ["--quick"] if quick else []
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            results[section][variant] = json.loads(out.strip().splitlines()[-1])
            print(f"  memory {section} {variant}: {results[section][variant]}", file=sys.stderr, flush=True)
        shutil.rmtree(os.path.dirname(svf_path))
    return results


def memory_table(results: dict) -> tuple[str, list[list[str]]]:
    rows, targets = [], []
    for section, per in results.items():
        size, batch, os8 = RESNET_SETTINGS[section]
        direct = per["direct"]["step1_peak_mib"]
        for variant, r in per.items():
            rows.append(
                [
                    f"{size} px b{batch}{' OS8' if os8 else ''}",
                    variant,
                    f"{r['model_mib']:.0f}",
                    f"{r['step1_peak_mib']:.0f}",
                    f"{r['step2_peak_mib']:.0f}",
                    f"{r['kept_after_step_mib']:.0f}",
                    f"{r['model_mib'] + r['step1_peak_mib']:.0f}",
                    f"{r['step1_peak_mib'] / direct:.2f}x",
                ]
            )
        for variant in ("auto", "three_op", "rebuilt", "lean"):
            ratio = per[variant]["step1_peak_mib"] / direct
            targets.append(
                [f"memory {section}", f"{variant} step peak <= direct", f"{ratio:.3f}x", verdict(ratio, 1.0)]
            )
        ratio = (per["auto"]["model_mib"] + per["auto"]["step1_peak_mib"]) / (
            per["direct"]["model_mib"] + per["direct"]["step1_peak_mib"]
        )
        targets.append([f"memory {section}", "auto model+step peak <= direct (info)", f"{ratio:.3f}x", "-"])
    header = [
        "setting",
        "variant",
        "model MiB",
        "step 1 peak MiB",
        "step 2 peak MiB",
        "kept after step MiB",
        "model + step 1 MiB",
        "step 1 vs direct",
    ]
    return md_table(header, rows), targets


# --------------------------------------------------------------------------------------------- section 5
def bench_eval(warmup: int, repeats: int) -> dict:
    plain = plain_resnet("r224").eval()
    svf = svftune.apply_svf(copy.deepcopy(plain), RESNET_LAYERS, progress=False)
    with torch.no_grad():  # a fine-tuned model: S moved away from S0, so the cached rebuilt weight is used
        generator = torch.Generator().manual_seed(2)
        for _, layer in svftune.svf_layers(svf):
            layer.S.mul_(1 + 0.01 * torch.randn(layer.S.shape, generator=generator))
    svf.eval()
    merged = svftune.merge_svf(copy.deepcopy(svf)).eval()
    torch.manual_seed(1)
    size, batch, _ = RESNET_SETTINGS["r224"]
    x = torch.randn(batch, 3, size, size)
    models = {"plain": plain, "unmerged": svf, "merged": merged}

    def forward(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return model(x)

        return run

    with torch.no_grad():
        max_diff = (svf(x) - merged(x)).abs().max().item()
    before = load()
    times = interleaved({k: forward(m) for k, m in models.items()}, warmup, repeats)
    return {
        "seconds": times,
        "median": {k: median(v) for k, v in times.items()},
        "max_abs_diff_unmerged_vs_merged": max_diff,
        "load_before": before,
        "load_after": load(),
        "size": size,
        "batch": batch,
    }


def eval_table(result: dict) -> tuple[str, list[list[str]]]:
    med = result["median"]
    low = {k: min(v) for k, v in result["seconds"].items()}
    rows = [[k, f"{v:.4f}", f"{low[k]:.4f}", f"{v / med['plain']:.3f}x"] for k, v in med.items()]
    title = f"ResNet-50 batch {result['batch']}, {result['size']} px, eval + no_grad, "
    title += f"{len(result['seconds']['plain'])} repeats, load "
    title += f"{result['load_before']} -> {result['load_after']}; max |unmerged - merged| output difference "
    title += f"{result['max_abs_diff_unmerged_vs_merged']:.2e}"
    unmerged, merged = med["unmerged"] / med["plain"], med["merged"] / med["plain"]
    targets = [
        ["eval", "unmerged <= 1.05x plain", f"{unmerged:.3f}x", verdict(unmerged, 1.05)],
        ["eval", "merged = plain (within 3%)", f"{merged:.3f}x", "PASS" if abs(merged - 1) <= 0.03 else "FAIL"],
    ]
    return title + "\n\n" + md_table(["model", "median s/forward", "min s/forward", "vs plain"], rows), targets


# --------------------------------------------------------------------------------------------- section 6
def folded(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach()
    groups = getattr(module, "groups", 1)
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def bare_svds(weights: list[torch.Tensor]) -> list[float]:
    seconds = []
    for w in weights:
        start = time.perf_counter()
        thin_svd(w)
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_apply(layers: list[str], warmup: int, repeats: int, vgg: bool, plain_svd: bool) -> dict:
    """apply_svf on fresh copies vs thin_svd of the same folded weights, alternating which runs first."""
    result: dict = {"load_before": load()}
    plain = plain_resnet("r224")
    weights = [folded(m) for _, m in select_layers(plain, layers)]

    def apply_once() -> float:
        model = copy.deepcopy(plain)  # not timed
        start = time.perf_counter()
        svftune.apply_svf(model, layers, progress=False)
        return time.perf_counter() - start

    bare, applied = [], []
    for i in range(warmup + repeats):
        if i % 2:
            t_bare, t_apply = sum(bare_svds(weights)), apply_once()
        else:
            t_apply, t_bare = apply_once(), sum(bare_svds(weights))
        if i >= warmup:
            applied.append(t_apply)
            bare.append(t_bare)
    result["resnet50"] = {
        "layers_selected": layers,
        "apply": applied,
        "bare": bare,
        "apply_median": median(applied),
        "bare_median": median(bare),
        "layers": len(weights),
    }
    if vgg:
        gc.collect()
        torch.manual_seed(0)
        model = torchvision.models.vgg16()
        named = select_layers(model, None)
        weights = [folded(m) for _, m in named]
        per_layer = bare_svds(weights)
        start = time.perf_counter()
        svftune.apply_svf(model, None, progress=False)
        t_apply = time.perf_counter() - start
        del model
        gc.collect()
        big_index = max(range(len(weights)), key=lambda i: weights[i].numel())
        big = weights[big_index][0]
        entry = {
            "apply": t_apply,
            "bare": sum(per_layer),
            "layers": len(weights),
            "per_layer_bare": {name: t for (name, _), t in zip(named, per_layer, strict=True)},
            "classifier_name": named[big_index][0],
            "classifier_shape": list(big.shape),
            "classifier_thin_svd": per_layer[big_index],
        }
        if plain_svd:
            print(f"  plain float64 SVD of {list(big.shape)} (minutes)...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            torch.linalg.svd(big.double(), full_matrices=False)
            entry["classifier_plain_svd"] = time.perf_counter() - start
        result["vgg16"] = entry
    result["load_after"] = load()
    return result


def apply_table(result: dict) -> tuple[str, list[list[str]]]:
    r = result["resnet50"]
    ratio = r["apply_median"] / r["bare_median"]
    selected = ",".join(r["layers_selected"])
    rows = [
        [
            f"ResNet-50 {selected} ({r['layers']} layers): median of {len(r['apply'])}",
            f"{r['apply_median']:.2f}",
            f"{r['bare_median']:.2f}",
            f"{ratio:.2f}x",
        ],
        [
            f"ResNet-50 {selected}: min of {len(r['apply'])}",
            f"{min(r['apply']):.2f}",
            f"{min(r['bare']):.2f}",
            f"{min(r['apply']) / min(r['bare']):.2f}x",
        ],
    ]
    targets = [
        ["apply", f"apply_svf(ResNet-50 {selected}) <= 1.2x bare thin_svd", f"{ratio:.3f}x", verdict(ratio, 1.2)]
    ]
    lines = []
    if "vgg16" in result:
        v = result["vgg16"]
        rows.append(
            [
                f"VGG16 all ({v['layers']} layers), once",
                f"{v['apply']:.1f}",
                f"{v['bare']:.1f}",
                f"{v['apply'] / v['bare']:.2f}x",
            ]
        )
        shape = "x".join(map(str, v["classifier_shape"]))
        lines.append(
            f"- VGG16 `{v['classifier_name']}` ({shape}): thin_svd (QR first) {v['classifier_thin_svd']:.1f} s"
        )
        if "classifier_plain_svd" in v:
            plain = v["classifier_plain_svd"]
            lines[-1] += f", plain `torch.linalg.svd(float64)` {plain:.1f} s ({plain / v['classifier_thin_svd']:.1f}x)"
            lines.append(
                f"- whole VGG16 apply_svf {v['apply']:.1f} s vs plain SVD of the classifier alone {plain:.1f} s"
            )
            targets.append(
                [
                    "apply",
                    "VGG16 apply_svf < plain SVD of classifier",
                    f"{v['apply'] / plain:.3f}x",
                    verdict(v["apply"], plain),
                ]
            )
    table = md_table(["what", "apply_svf s", "bare thin_svd s", "ratio"], rows)
    title = f"load {result['load_before']} -> {result['load_after']}"
    return title + "\n\n" + table + ("\n\n" + "\n".join(lines) if lines else ""), targets


# --------------------------------------------------------------------------------------------- section 7
def layer_records(svf: nn.Module, x: torch.Tensor) -> list[dict]:
    """Input shape, input requires_grad and the cost model's choice of every SVF layer in one training forward."""
    records, hooks = [], []
    for name, layer in svftune.svf_layers(svf):

        def hook(module, args, name=name):
            (inp,) = args
            records.append(
                {
                    "name": name,
                    "input": list(inp.shape),
                    "input_grad": inp.requires_grad,
                    "auto_three_op": module.uses_three_op(inp),
                }
            )

        hooks.append(layer.register_forward_pre_hook(hook))
    svf(x).float().mean().backward()
    for h in hooks:
        h.remove()
    for parameter in svf.parameters():
        parameter.grad = None
    return records


def predicted_ratio(layer, positions: int, input_grad: int) -> float:
    """three_op / rebuilt multiply-adds, as the cost model in layers.py counts them."""
    three_op, rebuilt = layer.training_costs(positions, bool(input_grad))
    return three_op / rebuilt


def bench_layers(section: str, warmup: int, repeats: int) -> dict:
    size, batch, _ = RESNET_SETTINGS[section]
    plain = plain_resnet(section)
    svf = make_variant(plain, "auto", RESNET_LAYERS)
    torch.manual_seed(1)
    records = layer_records(svf, torch.randn(batch, 3, size, size))
    groups: dict[tuple, dict] = {}
    for rec in records:
        layer = svf.get_submodule(rec["name"])
        key = (
            tuple(layer.base_weight.shape),
            layer.stride,
            layer.dilation,
            tuple(rec["input"]),
            rec["input_grad"],
        )
        if key in groups:
            groups[key]["names"].append(rec["name"])
        else:
            groups[key] = {"names": [rec["name"]], **rec}
    rows = []
    for key, g in groups.items():
        name = g["names"][0]
        svf_layer = svf.get_submodule(name)
        three_op = copy.deepcopy(svf_layer)
        three_op.form = "three_op"
        rebuilt = copy.deepcopy(svf_layer)
        rebuilt.form = "rebuilt"
        direct = copy.deepcopy(plain.get_submodule(name))
        direct.weight.requires_grad_(True)
        torch.manual_seed(3)
        x = torch.randn(g["input"], requires_grad=g["input_grad"])
        grad_out = torch.randn_like(direct(x))
        modules = {"three_op": three_op.train(), "rebuilt": rebuilt.train(), "direct": direct.train()}

        def fwd_bwd(module: nn.Module, x=x, grad_out=grad_out) -> Callable[[], None]:
            def run() -> None:
                module(x).backward(grad_out)
                x.grad = None
                for p in module.parameters():
                    p.grad = None

            return run

        times = interleaved({k: fwd_bwd(m) for k, m in modules.items()}, warmup, repeats)
        med = {k: median(v) for k, v in times.items()}
        positions = svf_layer._output_positions(x)
        rows.append(
            {
                "names": g["names"],
                "weight": list(key[0]),
                "stride": key[1][0],
                "dilation": key[2][0],
                "input": g["input"],
                "input_grad": g["input_grad"],
                "auto_three_op": g["auto_three_op"],
                "predicted_three_op_over_rebuilt": predicted_ratio(svf_layer, positions, int(g["input_grad"])),
                "median": med,
                "min": {k: min(v) for k, v in times.items()},
            }
        )
    return {"rows": rows, "load": load(), "repeats": repeats}


def layers_table(section: str, result: dict) -> str:
    size, batch, os8 = RESNET_SETTINGS[section]
    header = [
        "layer (first of n)",
        "n",
        "weight",
        "s/d",
        "input HxW",
        "dx",
        "auto",
        "pred 3op/rb",
        "3op ms",
        "rebuilt ms",
        "direct ms",
        "meas 3op/rb",
        "best",
    ]
    rows = []
    totals = {"three_op": 0.0, "rebuilt": 0.0, "direct": 0.0, "auto": 0.0, "best": 0.0}
    wrong = 0
    for r in result["rows"]:
        med, n = r["min"], len(r["names"])
        best = "three_op" if med["three_op"] <= med["rebuilt"] else "rebuilt"
        auto = "three_op" if r["auto_three_op"] else "rebuilt"
        for k in ("three_op", "rebuilt", "direct"):
            totals[k] += n * med[k]
        totals["auto"] += n * med[auto]
        totals["best"] += n * med[best]
        mark = "" if auto == best else " (auto wrong)"
        wrong += n if auto != best else 0
        rows.append(
            [
                r["names"][0],
                n,
                "x".join(map(str, r["weight"])),
                f"{r['stride']}/{r['dilation']}",
                "x".join(map(str, r["input"][2:])),
                "y" if r["input_grad"] else "n",
                auto,
                f"{r['predicted_three_op_over_rebuilt']:.2f}",
                f"{1e3 * med['three_op']:.1f}",
                f"{1e3 * med['rebuilt']:.1f}",
                f"{1e3 * med['direct']:.1f}",
                f"{med['three_op'] / med['rebuilt']:.2f}",
                best + mark,
            ]
        )
    summary = ", ".join(f"{k} {v:.3f} s" for k, v in totals.items())
    title = f"**layers {section}**: ResNet-50{' OS8' if os8 else ''} batch {batch}, {size} px, per-layer forward + "
    title += f"backward (min of {result['repeats']} runs), "
    count = sum(len(r["names"]) for r in result["rows"])
    title += f"load {result['load']}. Weighted sums over all {count} layers"
    title += f": {summary}; auto picks the slower form for {wrong} layers."
    return title + "\n\n" + md_table(header, rows)


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats, skip VGG16: a smoke run")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per training benchmark")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds per benchmark")
    parser.add_argument("--skip-vgg", action="store_true", help="skip the whole-VGG16 apply_svf timing")
    parser.add_argument(
        "--skip-plain-svd", action="store_true", help="skip the plain float64 SVD of VGG16's classifier (minutes)"
    )
    parser.add_argument(
        "--no-optimizer", action="store_true", help="time training steps without the SGD step (forward + backward)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")
    parser.add_argument("--memory-worker", nargs=3, metavar=("SECTION", "VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    global TIME_OPTIMIZER
    TIME_OPTIMIZER = not args.no_optimizer
    if args.quick:
        use_quick_settings()
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker)))
        return

    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    repeats = args.repeats if args.repeats is not None else 2 if args.quick else 9
    big_repeats = max(1, repeats * 2 // 3)  # the 473 px steps are ~4x longer
    info = machine_info()
    info.update(argv=sys.argv[1:], warmup=warmup, repeats=repeats)
    print(f"machine: {info}", file=sys.stderr, flush=True)
    results: dict = {"machine": info}
    out: list[str] = []
    targets: list[list[str]] = []

    def note(section: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {section} (load {load()})", file=sys.stderr, flush=True)

    for section in ("r224", "r473", "vit"):
        if section in args.sections:
            note(section)
            reps = big_repeats if section == "r473" else repeats
            results[section] = bench_training(section, warmup if section != "r473" else 1, reps)
            out.append(training_table(section, results[section]))
            targets += training_targets(section, results[section])
            print(out[-1] + "\n", file=sys.stderr, flush=True)
    if "memory" in args.sections:
        note("memory")
        results["memory"] = bench_memory(["r224", "r473"], args.quick)
        table, rows = memory_table(results["memory"])
        out.append("**memory**: RSS in MiB, each variant in its own process\n\n" + table)
        targets += rows
    if "eval" in args.sections:
        note("eval")
        results["eval"] = bench_eval(warmup, repeats * 2)
        table, rows = eval_table(results["eval"])
        out.append("**eval**: " + table)
        targets += rows
    if "apply" in args.sections:
        note("apply")
        results["apply"] = bench_apply(
            ["layer2"] if args.quick else RESNET_LAYERS,
            1,
            1 if args.quick else 5,
            vgg=not (args.quick or args.skip_vgg),
            plain_svd=not (args.quick or args.skip_plain_svd),
        )
        table, rows = apply_table(results["apply"])
        out.append("**apply**: " + table)
        targets += rows
    if "layers" in args.sections:
        for section in ("r224", "r473"):
            note(f"layers {section}")
            results[f"layers_{section}"] = bench_layers(section, 1, 3 if args.quick else 5)
            out.append(layers_table(section, results[f"layers_{section}"]))

    info["load_end"] = load()
    caveat = " (--quick: smaller inputs, 1-2 repeats: a smoke run, the verdicts mean nothing)" if args.quick else ""
    out.append(f"**targets**{caveat}\n\n" + md_table(["benchmark", "target", "measured (medians)", "verdict"], targets))
    results["targets"] = targets
    header = f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), torch "
    header += f"{info['torch']}, torchvision {info['torchvision']}, {info['date']}, load {info['load_start']} -> "
    header += f"{info['load_end']}; warm-up {warmup}, repeats {repeats} (r473: {big_repeats})"
    print(header + "\n\n" + "\n\n".join(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
