"""Exactness: apply / merge / unapply and the three training forms against a float64 reference, per precision.

Models: torchvision ResNet-50 (every Conv/Linear adapted; BatchNorm statistics calibrated on the input so the
activations keep their scale) and one ViT-B/16 encoder block (``EncoderBlock``: its MLP and attention output
projection). ``--quick``: ResNet-18 at 64 px and a 32-wide block. For each precision mode (fp32 with TF32 off,
fp32 with TF32 on, bf16 and fp16 autocast):

- apply: the eval forward of the freshly adapted model is bit-identical to the plain model's (or, if the plain
  model itself is not bit-reproducible there, within the mode's tolerance);
- forms: with perturbed singular values (as after training), the training forward and ``dL/dS`` of ``three_op``,
  ``rebuilt`` and ``lean`` against the float64 model built from the same factors;
- merge: ``merge_svf`` of that model, run in the mode, against the same reference. Its error is the mode's
  *floor* (what any model with these weights gets in that precision); the floor for ``dL/dS`` is the plain
  merged model's weight gradient projected onto the singular vectors in float64;
- unapply (once, fp32): the original Parameter objects come back and the output is bit-identical again.

A form passes when its error is within ``TOL[mode]`` or within ``FLOOR_FACTOR`` times the floor.
"""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import Tensor, nn

import svftune
from svftune.matching import select_layers

from .common import MODES, Context, calibrate_bn, fmt, norm_error, precision, rel_error, tf32, timed

#: (output, dL/dS) tolerances per mode, relative (output: max-abs; gradient: norm)
TOL = {"fp32": (1e-4, 1e-3), "tf32": (3e-2, 1e-1), "bf16": (1e-1, 2e-1), "fp16": (3e-2, 1e-1)}
FLOOR_FACTOR = 4.0
FORMS = ("three_op", "rebuilt", "lean")


def _models(ctx: Context) -> list[tuple[str, nn.Module, Tensor]]:
    from torchvision.models.vision_transformer import EncoderBlock

    torch.manual_seed(0)
    if ctx.quick:
        resnet, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
        block, tokens = EncoderBlock(2, 32, 64, 0.0, 0.0), torch.randn(1, 10, 32)
    else:
        resnet, x = torchvision.models.resnet50(), torch.randn(2, 3, 224, 224)
        block, tokens = EncoderBlock(12, 768, 3072, 0.0, 0.0), torch.randn(2, 197, 768)
    resnet, x = resnet.to(ctx.device), x.to(ctx.device)
    with tf32(False):
        calibrate_bn(resnet, x)
    name = "resnet18" if ctx.quick else "resnet50"
    return [(name, resnet, x), ("vit_block", block.to(ctx.device).eval(), tokens.to(ctx.device))]


def _perturb(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            noise = torch.randn(layer.S.shape, generator=generator, dtype=torch.float64)
            layer.S.mul_((1 + 0.1 * noise).to(layer.S.device, layer.S.dtype))


def _s_grads(model: nn.Module) -> Tensor:
    return torch.cat([layer.S.grad.detach().double().reshape(-1) for _, layer in svftune.svf_layers(model)])


def _form_pass(svf: nn.Module, form: str, x: Tensor, probe: Tensor, mode: str, device) -> tuple[Tensor, Tensor]:
    """Output and concatenated dL/dS of one training forward+backward in ``form`` under ``mode``."""
    for _, layer in svftune.svf_layers(svf):
        layer.form = form
        layer.S.grad = None
    svf.train()
    with precision(mode, device):
        out = svf(x)
    (out.float() * probe).sum().backward()
    return out.detach(), _s_grads(svf)


def _reference(svf: nn.Module, x: Tensor, probe: Tensor) -> tuple[Tensor, Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """float64 output and dL/dS of the model built from the same factors, and its float64 ``(U, Vh)`` per layer."""
    ref = copy.deepcopy(svf).double()
    with tf32(False):
        out, grads = _form_pass(ref, "rebuilt", x.double(), probe.double(), "fp32", x.device)
    factors = {name: (layer.U.detach(), layer.Vh.detach()) for name, layer in svftune.svf_layers(ref)}
    return out, grads, factors


def _floor(svf: nn.Module, x: Tensor, probe: Tensor, mode: str, factors) -> tuple[Tensor, Tensor]:
    """Output (eval, no grad) and projected weight gradient of the merged plain model in ``mode``."""
    merged = svftune.merge_svf(copy.deepcopy(svf)).eval()
    with torch.no_grad(), precision(mode, x.device):
        out = merged(x)
    with precision(mode, x.device):
        loss = (merged(x).float() * probe).sum()
    loss.backward()
    parts = []
    for name, (u, vh) in factors.items():
        module = merged.get_submodule(name)
        grad = module.weight.grad.double().reshape(u.shape[0], u.shape[1], -1)
        parts.append(torch.einsum("gor,goi,gri->gr", u, grad, vh).reshape(-1))
    return out, torch.cat(parts)


def _check_model(ctx: Context, name: str, plain: nn.Module, x: Tensor, rows: list) -> None:
    report = ctx.report
    svf = copy.deepcopy(plain)
    originals = {n: m.weight for n, m in select_layers(svf, None)}
    seconds = timed(lambda: svftune.apply_svf(svf, progress=False), ctx)
    report.metric(f"{name}.apply_seconds", seconds)
    report.metric(f"{name}.adapted_layers", len(svftune.svf_layers(svf)))
    svf.eval()
    for mode in MODES:
        if mode not in ctx.modes():
            continue
        with torch.no_grad(), precision(mode, ctx.device):
            first, second, adapted = plain(x), plain(x), svf(x)
        repeatable = torch.equal(first, second)
        identical = torch.equal(adapted, first)
        error = rel_error(adapted, first)
        ok = identical or (not repeatable and error <= TOL[mode][0])
        detail = "bit-identical" if identical else f"plain model repeatable: {repeatable}"
        report.check(f"{name}/{mode}/apply: eval output as the plain model's", ok, error, 0.0, detail)

    torch.manual_seed(1)
    with torch.no_grad():
        probe = torch.randn_like(plain(x).float())
    _perturb(svf)
    ref_out, ref_grad, factors = _reference(svf, x, probe)
    for mode in MODES:
        if mode not in ctx.modes():
            continue
        if not ctx.time_for(10):
            report.short(f"{name}/{mode}")
            continue
        out_tol, grad_tol = TOL[mode]
        floor_out, floor_grad = _floor(svf, x, probe, mode, factors)
        floor_e, floor_g = rel_error(floor_out, ref_out), norm_error(floor_grad, ref_grad)
        report.check(f"{name}/{mode}/merge: output vs float64", floor_e <= out_tol, floor_e, out_tol)
        row = [name, mode, fmt(floor_e), fmt(floor_g)]
        for form in FORMS:
            out, grad = _form_pass(svf, form, x, probe, mode, ctx.device)
            out_e, grad_e = rel_error(out, ref_out), norm_error(grad, ref_grad)
            limit_out, limit_grad = max(out_tol, FLOOR_FACTOR * floor_e), max(grad_tol, FLOOR_FACTOR * floor_g)
            report.check(f"{name}/{mode}/{form}: output vs float64", out_e <= limit_out, out_e, limit_out)
            report.check(f"{name}/{mode}/{form}: dL/dS vs float64", grad_e <= limit_grad, grad_e, limit_grad)
            row += [fmt(out_e), fmt(grad_e)]
        rows.append(row)

    svftune.unapply_svf(svf)
    same_objects = all(svf.get_submodule(n).weight is w for n, w in originals.items())
    with torch.no_grad(), tf32(False):
        restored = torch.equal(svf.eval()(x), plain(x))
    report.check(f"{name}/unapply: original Parameters back, output bit-identical", same_objects and restored, None)


def run(ctx: Context) -> None:
    rows: list = []
    for name, plain, x in _models(ctx):
        if not ctx.time_for(15):
            ctx.report.short(name)
            continue
        _check_model(ctx, name, plain, x, rows)
        del plain
        if ctx.cuda:
            torch.cuda.empty_cache()
    header = ["model", "mode", "merged out (floor)", "merged dS (floor)"]
    header += [f"{form} {what}" for form in FORMS for what in ("out", "dS")]
    ctx.report.table("Relative error against float64 (output: max-abs, dL/dS: norm)", header, rows)
    skipped = [m for m in MODES if m not in ctx.modes()]
    if skipped:
        ctx.report.note(f"modes {', '.join(skipped)} need CUDA (TF32 and fp16 autocast): not run on {ctx.device}")
