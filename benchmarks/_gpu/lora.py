"""SVF against PEFT LoRA on the same layers: training step time and peak memory (skipped without peft).

The setting and the step are the training section's (ResNet-50 layers 2-4, 473 px, OS8, batch 8; fp32 and bf16
autocast). LoRA goes through the real ``peft`` package (``LoraConfig`` + ``inject_adapter_in_model``),
``lora_alpha = r``, no dropout, only the LoRA factors trainable, BatchNorm frozen as for SVF. Its targets are the
ungrouped, undilated convs of layers 2-4: PEFT's LoRA Conv2d builds its ``A`` conv with the base conv's kernel,
stride and padding but not its dilation (peft 0.21), so on the dilated 3x3 convs of layers 3-4 (output stride 8)
its output has another size and the forward fails; the section measures that too. SVF and ``direct`` adapt the
same layers. Variants: SVF ``auto`` and ``lean``, LoRA at two ranks (``--quick``: one), and ``direct``
fine-tuning. A check first confirms that LoRA starts as the plain model (its ``B`` factor is zero).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import svftune
from svftune.matching import select_layers

from .common import RESNET_LAYERS, Context, last_output, rel_error, resnet_backbone, tf32
from .training import DTYPES, measure, setting

RANKS = (4, 16)


def targets(model: nn.Module, dilated: bool = False) -> list[str]:
    """Ungrouped Conv2d names of layers 2-4, undilated ones only unless ``dilated``."""
    return [
        name
        for name, m in select_layers(model, RESNET_LAYERS)
        if isinstance(m, nn.Conv2d) and m.groups == 1 and (dilated or max(m.dilation) == 1)
    ]


def lora_model(plain: nn.Module, rank: int, layers: list[str]) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(plain)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=layers, bias="none")
    inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    svftune.freeze_batchnorm(model)
    return model


def run(ctx: Context) -> None:
    try:
        import peft
    except ImportError:
        ctx.report.skip("peft is not installed (pip install peft)")
        return
    from bench_core import make_variants

    report = ctx.report
    report.metric("peft", peft.__version__)
    size, batch = setting(ctx)
    plain = resnet_backbone(ctx.quick).to(ctx.device).eval()
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=ctx.device)
    layers = targets(plain)
    dilated = sorted(set(targets(plain, dilated=True)) - set(layers))
    report.metric("layers", {"adapted": len(layers), "dilated_left_out": dilated})
    if dilated:
        probe = lora_model(plain, 2, dilated[:1])
        try:
            with torch.no_grad():
                probe.eval()(x)
            works = True
        except RuntimeError as err:
            works = False
            report.note(f"PEFT LoRA on the dilated conv {dilated[0]} fails: {str(err)[:160]}")
        report.metric("peft_lora_on_dilated_conv_runs", works)
    selected = set(layers)
    models = make_variants(plain, ("auto", "lean", "direct"), lambda name, module: name in selected)
    for rank in RANKS[:1] if ctx.quick else RANKS:
        model = lora_model(plain, rank, layers)
        with torch.no_grad(), tf32(False):
            error = rel_error(last_output(model.eval()(x)), last_output(plain(x)))
        report.check(f"LoRA r={rank} starts as the plain model", error <= 1e-5, error, 1e-5)
        models[f"lora r={rank}"] = model
    rows = []
    for index, (label, dtype) in enumerate(DTYPES.items()):
        if not ctx.time_for(10):
            report.short(label)
            continue
        rows += measure(ctx, models, x, dtype, ctx.left() * 0.8 / (len(DTYPES) - index), label)
    header = ["precision", "variant", "median step (ms)", "vs direct", "peak (GiB)", "step peak (GiB)", "trainable"]
    report.table(f"SVF vs PEFT LoRA, {batch} x {size} px, OS8, layers 2-4 on {ctx.device}", header, rows)
