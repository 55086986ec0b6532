"""Training step of ResNet-50 layers 2-4 at 473 px, output stride 8, batch 8, in fp32 and bf16 autocast.

The model is ``svf_fss``'s dilated ResNet-50 (``--quick``: one bottleneck per stage, 64 px, batch 1). Variants,
side by side on the device and interleaved after warm-up (``bench_core.make_variants``: one decomposition, the
forced forms are copies): SVF ``auto`` / ``three_op`` / ``rebuilt`` / ``lean``; ``direct`` (the same conv weights
trained directly, everything else frozen); ``floor`` (everything frozen, but the backward still runs from the
loss down to layer2's input: what any method that trains layer2 pays at least). A step is forward, ``loss =
out.float().square().mean()`` on layer4's output, backward, ``SGD(momentum=0.9).step()``, ``zero_grad``. Times
are CUDA events (wall clock on CPU), medians; peak memory is ``max_memory_allocated`` over one step, with the
optimizer state already allocated. "fp32" keeps torch's default TF32 flags (recorded in the metrics).

Then, per distinct layer (weight shape, stride, dilation, input shape), the forward+backward of the layer alone
in ``three_op``, ``rebuilt`` and ``lean`` (and the plain conv, for reference): whether ``form="auto"``'s cost model
picked the faster of three_op and rebuilt on this device, and where it did not, by how much.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

import svftune

from .common import RESNET_LAYERS, Context, fmt, last_output, median, peak_memory, resnet_backbone, tf32_flags
from .common import time_calls as _time_calls

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
SVF_FORMS = ("auto", "three_op", "rebuilt", "lean")
#: a form counts as the fastest when within this factor of the fastest measured
NEAR = 1.05


def autocast(dtype: torch.dtype | None, device: torch.device):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def setting(ctx: Context) -> tuple[int, int]:
    """(image size, batch)."""
    return (64, 1) if ctx.quick else (473, 8)


def step_fn(model: nn.Module, x: Tensor, dtype: torch.dtype | None):
    """One training step of ``model`` on ``x`` (returns the loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9) if params else None
    model.train()

    def step() -> Tensor:
        with autocast(dtype, x.device):
            out = last_output(model(x))
        loss = out.float().square().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def floor_model(plain: nn.Module, first: str = "layer2") -> nn.Module:
    """Everything frozen; layer ``first``'s input becomes a leaf that needs a gradient, so the backward runs."""
    model = copy.deepcopy(plain)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    svftune.freeze_batchnorm(model)
    model.get_submodule(first).register_forward_pre_hook(lambda module, args: (args[0].detach().requires_grad_(),))
    return model


def measure(ctx: Context, models: dict[str, nn.Module], x: Tensor, dtype, seconds: float, label: str) -> list:
    """Time and (CUDA) peak memory of each model's training step; records metrics, returns table rows."""
    report = ctx.report
    steps = {name: step_fn(model, x, dtype) for name, model in models.items()}
    losses = {name: float(step()) for name, step in steps.items()}  # first step: optimizer state, lazy inits
    ok = all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    report.check(f"{label}: every variant's step gives a finite loss", ok, losses)
    warmup, repeats = (1, 2) if ctx.quick else (2, 40)
    times = _time_calls(steps, ctx, warmup, repeats, seconds)
    med = {name: median(values) for name, values in times.items()}
    memory = {name: peak_memory(steps[name], ctx) for name in steps}
    report.metric(f"{label}.median_step_seconds", med)
    report.metric(f"{label}.repeats", {name: len(v) for name, v in times.items()})
    if ctx.cuda:
        report.metric(f"{label}.memory_gib", memory)
    base = med.get("direct")
    rows = []
    for name in models:
        mem = memory[name]
        rows.append(
            [
                label,
                name,
                fmt(med[name] * 1000, 4),
                fmt(med[name] / base) if base else "-",
                fmt(mem["peak_gib"]) if mem else "-",
                fmt(mem["step_gib"]) if mem else "-",
                svftune.trainable_parameters(models[name])[0],
            ]
        )
    return rows


def _layer_inputs(model: nn.Module, x: Tensor, dtype) -> dict[str, tuple[list[int], torch.dtype, bool]]:
    """Input shape, dtype and requires_grad of every SVF layer in one training forward."""
    seen, hooks = {}, []
    for name, layer in svftune.svf_layers(model):

        def hook(module, args, name=name):
            seen[name] = (list(args[0].shape), args[0].dtype, args[0].requires_grad)

        hooks.append(layer.register_forward_pre_hook(hook))
    with autocast(dtype, x.device):
        last_output(model.train()(x))
    for h in hooks:
        h.remove()
    return seen


def _fwd_bwd(module: nn.Module, x: Tensor, grad: Tensor, dtype):
    def run() -> None:
        with autocast(dtype, x.device):
            out = module(x)
        out.backward(grad.to(out.dtype))
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return run


def auto_choices(ctx: Context, plain: nn.Module, svf: nn.Module, x: Tensor, dtype, label: str) -> list:
    """Per distinct layer: three_op / rebuilt / lean / plain conv times, auto's pick, and whether it was fastest."""
    report = ctx.report
    groups: dict[tuple, list[str]] = {}
    inputs = _layer_inputs(svf, x, dtype)
    for name, (shape, in_dtype, needs_grad) in inputs.items():
        layer = svf.get_submodule(name)
        key = (tuple(layer.base_weight.shape), layer.stride, layer.dilation, tuple(shape), in_dtype, needs_grad)
        groups.setdefault(key, []).append(name)
    rows, missed, near = [], [], 0
    for (weight, stride, dilation, shape, in_dtype, needs_grad), names in groups.items():
        if not ctx.time_for(8):
            report.short(f"{label}: per-layer timing of {len(groups) - len(rows)} of {len(groups)} layer shapes")
            break
        svf_layer = svf.get_submodule(names[0])
        modules = {}
        for form in ("three_op", "rebuilt", "lean"):
            modules[form] = copy.deepcopy(svf_layer).train()
            modules[form].form = form
        direct = copy.deepcopy(plain.get_submodule(names[0])).train()
        direct.weight.requires_grad_(True)
        modules["direct"] = direct
        torch.manual_seed(3)
        xin = torch.randn(shape, device=ctx.device, dtype=in_dtype, requires_grad=needs_grad)
        with autocast(dtype, ctx.device):
            grad = torch.randn_like(direct(xin))
        fns = {k: _fwd_bwd(m, xin, grad, dtype) for k, m in modules.items()}
        times = _time_calls(fns, ctx, 1 if ctx.quick else 3, 2 if ctx.quick else 15, 3.0)
        med = {k: median(v) for k, v in times.items()}
        pick = "three_op" if svf_layer.uses_three_op(xin) else "rebuilt"
        other = "rebuilt" if pick == "three_op" else "three_op"
        ratio = med[pick] / med[other]
        near += ratio <= NEAR
        row = [label, ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else ""), len(names)]
        row += ["x".join(map(str, weight)), f"{stride[0]}/{dilation[0]}", "x".join(map(str, shape[2:])), pick]
        row += [fmt(med[k] * 1000, 4) for k in ("three_op", "rebuilt", "lean", "direct")] + [fmt(ratio)]
        rows.append(row)
        if ratio > NEAR:
            missed.append({"layers": names, "auto": pick, "auto_ms": med[pick] * 1000, "faster": other,
                           "faster_ms": med[other] * 1000, "ratio": ratio})  # fmt: skip
    report.metric(f"{label}.auto_fastest_layer_shapes", {"within_5pct": near, "measured": len(rows)})
    report.metric(f"{label}.auto_not_fastest", missed)
    for m in missed:
        report.note(
            f"{label}: auto runs {m['auto']} on {', '.join(m['layers'])} ({m['auto_ms']:.3f} ms) but {m['faster']} "
            f"takes {m['faster_ms']:.3f} ms ({m['ratio']:.2f}x)"
        )
    return rows


def build(ctx: Context) -> tuple[nn.Module, dict[str, nn.Module], Tensor]:
    from bench_core import make_variants

    size, batch = setting(ctx)
    plain = resnet_backbone(ctx.quick).to(ctx.device).eval()
    models = make_variants(plain, (*SVF_FORMS, "direct"), RESNET_LAYERS)
    models["floor"] = floor_model(plain)
    torch.manual_seed(1)
    return plain, models, torch.randn(batch, 3, size, size, device=ctx.device)


def run(ctx: Context) -> None:
    report = ctx.report
    report.metric("tf32_flags", tf32_flags())
    plain, models, x = build(ctx)
    size, batch = setting(ctx)
    report.metric("setting", {"size": size, "batch": batch, "layers": RESNET_LAYERS})
    rows, layer_rows = [], []
    for index, (label, dtype) in enumerate(DTYPES.items()):
        left_modes = len(DTYPES) - index
        if not ctx.time_for(15):
            report.short(label)
            continue
        rows += measure(ctx, models, x, dtype, ctx.left() * 0.55 / left_modes, label)
        layer_rows += auto_choices(ctx, plain, models["auto"], x, dtype, label)
    header = ["precision", "variant", "median step (ms)", "vs direct", "peak (GiB)", "step peak (GiB)", "trainable"]
    report.table(f"Training step, {batch} x {size} px, OS8, layers 2-4 on {ctx.device}", header, rows)
    header = [
        "precision",
        "layers",
        "n",
        "weight",
        "s/d",
        "input",
        "auto",
        "three_op ms",
        "rebuilt ms",
        "lean ms",
        "direct ms",
    ]
    report.table(
        "Per layer shape: auto's pick against the other form (forward + backward)", [*header, "auto/other"], layer_rows
    )
