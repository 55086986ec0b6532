"""Backbone fine-tuning strategies, selectable by one string (the paper's ablations, Tables 5-10).

``"name"`` or ``"name:arg,arg"`` where args are stages (``layer4``, ``layer2-4``, or bare ``4``, ``2-4``) and,
for ``partial``, a conv kind (``3x3`` or ``1x1``). Examples: ``"svf"``, ``"svf:layer3-4"``, ``"partial:3x3"``,
``"partial:layer4,1x1"``, ``"svf-us"``, ``"lora:r=2"``.

| strategy | what trains in the selected stages (default layer2-4; ``full``: all five) |
| --- | --- |
| ``frozen`` | nothing (the original methods) |
| ``svf`` | singular values S of every Conv (svftune, ``train="S"``) |
| ``svf+bn`` | S and the BatchNorm affine parameters |
| ``svf-u`` / ``svf-v`` / ``svf-us`` / ``svf-sv`` / ``svf-usv`` | those SVD factors (Table 7) |
| ``full`` | every parameter (conv weights and biases, BatchNorm affine) |
| ``partial`` | conv weights (and biases) of the selected stages, optionally only 3x3 or only 1x1 convs |
| ``bn`` | BatchNorm affine parameters |
| ``bias`` | every bias: conv biases where present (VGG) and BatchNorm shifts |
| ``adapter`` | a new residual adapter after each selected stage (Table 10); the backbone stays frozen |
| ``lora`` | PEFT LoRA factors on every ungrouped Conv (the ``peft`` package); ``lora:r=N`` sets the rank |

Always: BatchNorm running statistics are frozen (eval mode) in every strategy, and BatchNorm affine parameters
train only in ``svf+bn``, ``bn``, ``bias`` (shifts) and ``full``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

import svftune

from .backbones import STAGES, Backbone

SVF_FACTORS = {"svf": "S", "svf+bn": "S", "svf-u": "U", "svf-v": "V", "svf-us": "US", "svf-sv": "SV", "svf-usv": "USV"}
STRATEGIES = ("frozen", *SVF_FACTORS, "full", "partial", "bn", "bias", "adapter", "lora")
#: Default LoRA rank: on the mini benchmark's MobileNetV2 layers 2-4, rank 1 trains 16,312 backbone values against
#: SVF's 9,448 (the same order; rank 2: 32,624). tests/test_fss_models_strategies.py recomputes both counts.
LORA_RANK = 1
#: Learning-rate scale of the LoRA factors: lr/10, like SVF's singular values.
LORA_LR_SCALE = 0.1
DEFAULT_LAYERS = ("layer2", "layer3", "layer4")
CONV_KINDS = ("3x3", "1x1")
_NORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy: its name, the stages it touches, and for ``partial`` the conv kind."""

    name: str
    layers: tuple[str, ...]
    conv_kind: str | None = None
    rank: int | None = None  # lora only

    def __str__(self) -> str:
        args = list(self.layers) + ([self.conv_kind] if self.conv_kind else [])
        args += [f"r={self.rank}"] if self.rank is not None else []
        return self.name + (":" + ",".join(args) if args and self.name != "frozen" else "")

    @property
    def is_svf(self) -> bool:
        return self.name in SVF_FACTORS


def parse_strategy(
    spec: str | Strategy, layers: Sequence[str] | str | None = None, conv_kind: str | None = None
) -> Strategy:
    """Parse ``"name[:args]"`` (or pass a :class:`Strategy`); ``layers`` / ``conv_kind`` override the args."""
    parsed_rank = None
    if isinstance(spec, Strategy):
        name, parsed_layers, parsed_kind, parsed_rank = spec.name, list(spec.layers), spec.conv_kind, spec.rank
    elif isinstance(spec, str):
        name, _, args = spec.strip().lower().partition(":")
        parsed_layers, parsed_kind = [], None
        for token in filter(None, (t.strip() for t in args.split(","))):
            if token in CONV_KINDS:
                parsed_kind = token
            elif token.startswith("r="):
                parsed_rank = _parse_rank(token, spec)
            else:
                parsed_layers += _parse_layers(token, spec)
    else:
        raise TypeError(f"strategy must be a string such as 'svf' or 'partial:3x3', got {type(spec).__name__}")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    if layers is not None:
        parsed_layers = _parse_layers(layers, spec) if isinstance(layers, str) else list(layers)
        for layer in parsed_layers:
            if layer not in STAGES:
                raise ValueError(f"unknown stage {layer!r} in layers: use names among {', '.join(STAGES)}")
    if conv_kind is not None:
        parsed_kind = conv_kind
    if parsed_kind is not None and (name != "partial" or parsed_kind not in CONV_KINDS):
        raise ValueError(f"a conv kind ({parsed_kind!r}) applies to 'partial' only and must be '3x3' or '1x1'")
    if parsed_rank is not None and name != "lora":
        raise ValueError(f"a rank (r={parsed_rank}) applies to 'lora' only, not to {name!r}")
    if name == "frozen":
        return Strategy("frozen", ())
    if not parsed_layers:
        parsed_layers = list(STAGES if name == "full" else DEFAULT_LAYERS)
    ordered = tuple(s for s in STAGES if s in parsed_layers)
    if name == "lora" and parsed_rank is None:
        parsed_rank = LORA_RANK
    return Strategy(name, ordered, parsed_kind, parsed_rank)


def _parse_rank(token: str, spec: object) -> int:
    value = token[2:]
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"cannot read {token!r} in strategy {spec!r}: a LoRA rank is r=N with N >= 1 (e.g. lora:r=2)")
    return int(value)


def _parse_layers(token: str, spec: object) -> list[str]:
    match = re.fullmatch(r"(?:layer)?([0-4])(?:-(?:layer)?([0-4]))?", token.strip())
    if match is None:
        raise ValueError(
            f"cannot read {token!r} in strategy {spec!r}: give stages as layer4, layer2-4, 4 or 2-4, "
            "or a conv kind 3x3 / 1x1 (partial only)"
        )
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    if last < first:
        raise ValueError(f"empty stage range {token!r} in strategy {spec!r}")
    return [f"layer{i}" for i in range(first, last + 1)]


class ResidualAdapter(nn.Module):
    """``x + up(relu(down(x)))`` with 1x1 convs and ``channels // reduction`` hidden channels; ``up`` starts at zero,
    so the adapted backbone starts as the pretrained one. (The paper does not give its adapter's design.)"""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.down(x).relu())


def apply_strategy(
    target: nn.Module,
    strategy: str | Strategy = "frozen",
    *,
    layers: Sequence[str] | str | None = None,
    conv_kind: str | None = None,
    form: str = "auto",
    adapter_reduction: int = 4,
) -> list[dict]:
    """Freeze the backbone, then make trainable what ``strategy`` names; SVF strategies go through svftune.

    Args:
        target: a :class:`Backbone`, or a model with ``set_strategy`` (all methods here; BAM keeps a frozen
            copy of the backbone for its base learner first).
        strategy: see the module docstring.
        layers, conv_kind: override the stages / conv kind of ``strategy``.
        form: svftune training form (``"auto"``, ``"three_op"``, ``"rebuilt"``, ``"lean"``).
        adapter_reduction: hidden-channel reduction of the residual adapters.

    Returns:
        The backbone's optimizer groups (see :func:`backbone_param_groups`).
    """
    if not isinstance(target, Backbone):
        if hasattr(target, "set_strategy"):
            return target.set_strategy(
                strategy, layers=layers, conv_kind=conv_kind, form=form, adapter_reduction=adapter_reduction
            )
        raise TypeError(f"apply_strategy needs a Backbone or a few-shot model, got {type(target).__name__}")
    backbone = target
    spec = parse_strategy(strategy, layers, conv_kind)
    if backbone.strategy is not None:
        raise ValueError(f"backbone already has strategy {backbone.strategy}; build a fresh backbone to change it")
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    svftune.freeze_batchnorm(backbone)
    stages = [(name, getattr(backbone, name)) for name in spec.layers]

    if spec.is_svf:
        svftune.apply_svf(backbone, layers=list(spec.layers), train=SVF_FACTORS[spec.name], form=form)
        if spec.name == "svf+bn":
            _train(_norm_parameters(stages))
    elif spec.name == "full":
        _train(p for _, stage in stages for p in stage.parameters())
    elif spec.name == "partial":
        _train(p for conv in _convs(stages, spec.conv_kind) for p in conv.parameters(recurse=False))
    elif spec.name == "bn":
        _train(_norm_parameters(stages))
    elif spec.name == "bias":
        _train(p for _, stage in stages for n, p in stage.named_parameters() if n.rsplit(".", 1)[-1] == "bias")
    elif spec.name == "lora":
        _inject_lora(backbone, stages, spec.rank)
    elif spec.name == "adapter":
        for index, name in enumerate(STAGES):
            if name in spec.layers:
                reference = next(backbone.parameters())
                adapter = ResidualAdapter(backbone.channels[index], adapter_reduction)
                backbone.adapters[name] = adapter.to(device=reference.device, dtype=reference.dtype)
    backbone.strategy = spec
    return backbone_param_groups(backbone)


def lora_targets(stages: list[tuple[str, nn.Module]]) -> list[str]:
    """Backbone-relative names of the convs LoRA adapts: every Conv2d of the stages except grouped ones
    (depthwise convs): PEFT's LoRA needs the rank to be a multiple of ``groups`` there, which no small rank is."""
    return [
        f"{stage_name}.{name}"
        for stage_name, stage in stages
        for name, module in stage.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups == 1
    ]


def _inject_lora(backbone: Backbone, stages: list[tuple[str, nn.Module]], rank: int) -> None:
    """LoRA through the real ``peft`` package, injected into the backbone in place (no ``PeftModel`` wrapper):
    ``W x + B A x * alpha / r`` with ``B`` zero at the start, so the backbone starts as the pretrained one."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError(
            "strategy 'lora' uses the peft package, which is not installed: pip install peft (or 'svftune[peft]')"
        ) from None
    targets = lora_targets(stages)
    if not targets:
        raise ValueError(f"strategy 'lora' found no ungrouped Conv2d in {', '.join(n for n, _ in stages)}")
    # exact names (PEFT matches a list entry against the full name or a '.'-suffix of it; full names are unique)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, bias="none")
    inject_adapter_in_model(config, backbone)
    _match_dilation(backbone)
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(".lora_" in name)


def _match_dilation(backbone: nn.Module) -> None:
    """PEFT (0.21) builds LoRA's ``A`` conv with the base conv's kernel, stride and padding but not its dilation, so
    on the dilated convs of an output-stride-8 ResNet ``B A x`` comes out at another size than ``W x``. ``A`` with the
    base's dilation makes ``B A`` the kernel-space update LoRA means (``W + B A`` is what a merge would compute)."""
    for module in backbone.modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, nn.Conv2d) or not hasattr(module, "lora_A"):
            continue
        if base.padding_mode != "zeros":
            raise ValueError(f"strategy 'lora' supports zero-padded convs only, got padding_mode={base.padding_mode!r}")
        for conv in module.lora_A.values():
            conv.dilation = base.dilation


def _train(parameters) -> None:
    for parameter in parameters:
        parameter.requires_grad_(True)


def _norm_parameters(stages: list[tuple[str, nn.Module]]):
    for _, stage in stages:
        for module in stage.modules():
            if isinstance(module, _NORM):
                yield from module.parameters(recurse=False)


def _convs(stages: list[tuple[str, nn.Module]], kind: str | None):
    for _, stage in stages:
        for module in stage.modules():
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size
                if kind is None or (kind == "1x1" and k == (1, 1)) or (kind == "3x3" and k == (3, 3)):
                    yield module


def backbone_param_groups(backbone: Backbone) -> list[dict]:
    """Non-empty optimizer groups of the backbone's trainable parameters:

    - ``singular_values``: the S vectors of SVF layers, ``lr_scale`` 0.1 (the paper trains them at lr/10);
    - ``backbone``: any other pretrained backbone parameter that trains (U/V, conv weights, BatchNorm, biases),
      ``lr_scale`` 0.1 (the public code's lr/10 for backbone parameters);
    - ``adapters``: newly initialised adapter parameters, ``lr_scale`` 1;
    - ``lora``: PEFT LoRA factors (strategy ``lora``), ``lr_scale`` :data:`LORA_LR_SCALE` (lr/10, like SVF's S).
    """
    singular = {id(layer.S) for _, layer in svftune.svf_layers(backbone)}
    adapters = {id(p) for p in backbone.adapters.parameters()}
    groups = {"singular_values": [], "backbone": [], "adapters": [], "lora": []}
    for name, parameter in backbone.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in singular:
            key = "singular_values"
        elif ".lora_" in name:
            key = "lora"
        else:
            key = "adapters" if id(parameter) in adapters else "backbone"
        groups[key].append(parameter)
    scale = {"singular_values": 0.1, "backbone": 0.1, "adapters": 1.0, "lora": LORA_LR_SCALE}
    return [{"name": k, "params": v, "lr_scale": scale[k]} for k, v in groups.items() if v]
