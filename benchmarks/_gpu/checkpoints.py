"""Cross-device checkpoints: trained and saved on one device, loaded onto the same base decomposed on the other.

The model's layers are orthogonal-initialised, so every singular value of every layer is tied (all equal to 1):
any rotation inside a run is a valid SVD, LAPACK (CPU) and cuSOLVER (CUDA) may pick different ones, and only the
tied bases the checkpoint stores make ``S0' + delta`` the trained weight again. It trains a few SGD steps (which
moves the tied values apart), is saved, and loaded onto a freshly built base on the other device, where
``load_svf`` decomposes it again. The loaded model's eval output (and its three-op training forward) must match the
trained model's within ``TOL``, TF32 off. A control applies ``S0' + delta`` without the stored bases: its error
shows whether the other device's decomposition did rotate the tied runs. Then the decomposition cache: entries
written from the CPU decomposition are hit by the CUDA model (with TF32 off and on), and ``load_svf(...,
cache_dir=...)`` on CUDA reads them without writing new ones. Without CUDA both sides are the CPU.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import svftune
from svftune.fingerprint import weight_sha256
from svftune.matching import select_layers

from .common import Context, rel_error, tf32

#: relative max-abs output error: tests/test_checkpoint.py's bound for a re-decomposed load (docs/checkpoints.md:
#: the stored bases make the weight "exactly the trained weight again"; the rest is float32 rounding)
TOL = 1e-5
STEPS = 5


def tied_net(seed: int = 0) -> nn.Module:
    """Convs (one grouped), Linears; every weight orthogonal, so every layer's singular values are all 1."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 128),
        nn.Tanh(),
        nn.Linear(128, 10),
    )
    for module in model:
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.orthogonal_(module.weight)
    return model.eval()


def _data(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, 8, 8, generator=generator)
    y = torch.randint(0, 10, (16,), generator=generator)
    probe = torch.randn(4, 3, 8, 8, generator=generator)
    return x.to(device), y.to(device), probe.to(device)


def _train(device: torch.device) -> nn.Module:
    model = svftune.apply_svf(tied_net().to(device), progress=False)
    x, y, _ = _data(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    with tf32(False):
        for _ in range(STEPS):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _outputs(model: nn.Module, probe: Tensor) -> tuple[Tensor, Tensor]:
    """Eval output (no grad) and the three-op training forward (with grad) of ``model`` on ``probe``."""
    with tf32(False):
        with torch.no_grad():
            evaluated = model.eval()(probe)
        trained = copy.deepcopy(model).train()
        for _, layer in svftune.svf_layers(trained):
            layer.form = "three_op"
        three_op = trained(probe).detach()
    return evaluated, three_op


def _one_way(ctx: Context, source: torch.device, target: torch.device, tag: str) -> None:
    report = ctx.report
    label = f"{tag} {source.type}->{target.type}"
    trained = _train(source)
    path = ctx.scratch / f"{tag}.safetensors"
    svftune.save_svf(trained, path)
    checkpoint = svftune.read_svf(path)
    basis_runs = sum(t[3] == "basis" for entry in checkpoint.layers.values() for t in entry.ties)
    report.check(f"{label}: training moved tied values apart (runs stored as 'basis')", basis_runs > 0, basis_runs)
    _, _, probe = _data(source)
    with torch.no_grad(), tf32(False):
        expected = trained(probe)

    loaded = svftune.load_svf(tied_net().to(target), path)
    evaluated, three_op = _outputs(loaded, probe.to(target))
    for what, value in (("eval output", evaluated), ("three-op training forward", three_op)):
        error = rel_error(value, expected)
        report.check(f"{label}: {what} of the loaded model vs the trained one", error <= TOL, error, TOL)

    naive = svftune.apply_svf(tied_net().to(target), progress=False)
    with torch.no_grad():
        for name, layer in svftune.svf_layers(naive):
            layer.S.copy_(layer.S0 + checkpoint.deltas[name].to(layer.S))
        with tf32(False):
            report.metric(f"{label}.control_without_bases_error", rel_error(naive.eval()(probe.to(target)), expected))
    if target.type == "cuda":
        with torch.no_grad(), tf32(True):
            report.metric(f"{label}.loaded_error_tf32_on", rel_error(loaded(probe.to(target)), expected))


def _fingerprints(model: nn.Module) -> dict[int, str]:
    return {m.weight.data_ptr(): weight_sha256(m.weight) for _, m in select_layers(model, None)}


def _cache(ctx: Context, device: torch.device) -> None:
    report = ctx.report
    directory = ctx.scratch / "cache"
    first = svftune.DecompositionCache(directory)
    cpu_model = tied_net()
    svftune.apply_svf(cpu_model, decompose=first.provider(_fingerprints(cpu_model)), progress=False)
    layers = len(svftune.svf_layers(cpu_model))
    report.check(
        "cache: CPU decomposition stored", (first.hits, first.misses) == (0, layers), [first.hits, first.misses]
    )
    settings = [False, True] if device.type == "cuda" else [False]
    for use_tf32 in settings:
        cache = svftune.DecompositionCache(directory)
        model = tied_net().to(device)
        with tf32(use_tf32), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            svftune.apply_svf(model, decompose=cache.provider(_fingerprints(model)), progress=False)
        detail = "; ".join(str(w.message)[:160] for w in caught[:2])
        report.check(
            f"cache: {device.type} model hits every CPU entry (TF32 {'on' if use_tf32 else 'off'})",
            (cache.hits, cache.misses) == (layers, 0),
            [cache.hits, cache.misses],
            [layers, 0],
            detail,
        )
        if cache.misses:  # a discarded entry was recomputed and stored again from this device: start over
            again = tied_net()
            svftune.apply_svf(again, decompose=first.provider(_fingerprints(again)), progress=False)

    trained = _train(torch.device("cpu"))
    path = ctx.scratch / "cache_ckpt.safetensors"
    svftune.save_svf(trained, path)
    entries = sorted(p.name for p in directory.rglob("*.safetensors"))
    _, _, probe = _data(torch.device("cpu"))
    with torch.no_grad():
        expected = trained(probe)
    loaded = svftune.load_svf(tied_net().to(device), path, cache_dir=directory)
    with torch.no_grad(), tf32(False):
        error = rel_error(loaded(probe.to(device)), expected)
    after = sorted(p.name for p in directory.rglob("*.safetensors"))
    report.check(f"cache: load_svf(cache_dir) on {device.type} writes no new entry", after == entries, len(after))
    report.check(f"cache: load_svf(cache_dir) on {device.type} reproduces the model", error <= TOL, error, TOL)


def run(ctx: Context) -> None:
    cpu = torch.device("cpu")
    if not ctx.cuda:
        ctx.report.note(
            "no CUDA: both sides of every transfer are the CPU (the code path runs, the devices do not differ)"
        )
    _one_way(ctx, cpu, ctx.device, "forward")
    _one_way(ctx, ctx.device, cpu, "reverse")
    _cache(ctx, ctx.device)
