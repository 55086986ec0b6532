"""Load user-supplied backbone weights with strict key checks, and explain any mismatch.

Accepted files (``.pth``, loaded with ``torch.load(weights_only=True)``):

- ImageNet classifiers: torchvision ResNet-50 / VGG16-BN / MobileNetV2 state dicts, and the PSPNet deep-stem
  ``resnet50_v2.pth`` (keys ``conv1 bn1 conv2 bn2 conv3 bn3 layer1..4 fc``) that PFENet and BAM use.
  The classifier (``fc.*``, ``classifier.*``, MobileNetV2's ``features.18``) is ignored.
- Few-shot segmentation checkpoints whose backbone is stored as ``layer0`` .. ``layer4`` (PFENet, BAM's PSPNet
  base learner, this package's own models under ``backbone.``): the other parts (heads) are ignored.
- Any of these wrapped in ``{"state_dict": ...}`` (or ``"model"``, ``"model_state_dict"``, ``"net"``) and/or with
  ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefixes.

Every backbone tensor must be present with the right shape (BatchNorm ``num_batches_tracked`` counters are
optional); anything else is an error that says which format the file looks like and lists the missing,
unexpected and mis-shaped keys. The public code loads with ``strict=False`` and silently accepts wrong files.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .backbones import MOBILENET_V2_STAGES, STAGES, VGG16_BN_STAGES, Backbone

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "network")
PREFIXES = ("module.", "_orig_mod.")
#: ImageNet deep-stem key -> layer0 index (PFENet/BAM layout).
DEEP_STEM = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7"}
TORCHVISION_STEM = {"conv1": "0", "bn1": "1"}

DESCRIPTIONS = {
    "resnet50_v2": "PSPNet deep-stem ResNet-50 'v2' (three 3x3 stem convs, layer1 input 128 channels)",
    "resnet50": "torchvision ResNet-50 (7x7 stem conv, layer1 input 64 channels)",
    "vgg16_bn": "VGG16 with BatchNorm",
    "mobilenet_v2": "torchvision MobileNetV2",
}

HINTS = {
    ("resnet50", "resnet50_v2"): "build backbone 'resnet50' for this file, or supply the PSPNet deep-stem "
    "weights (resnet50_v2.pth, the ones PFENet and BAM use) for 'resnet50_v2'",
    ("resnet50_v2", "resnet50"): "build backbone 'resnet50_v2' for this file, or supply torchvision's ResNet-50 "
    "ImageNet weights for 'resnet50'",
    ("vgg16", "vgg16_bn"): "this is VGG16 without BatchNorm; the methods use VGG16-BN (torchvision vgg16_bn weights "
    "or PFENet's vgg16_bn.pth)",
}


class BackboneWeightsError(ValueError):
    """A weights file does not fit the backbone; the message says why."""


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did."""

    file_format: str
    loaded: int
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- reading
def read_state_dict(source: str | Path | Mapping) -> tuple[dict[str, Tensor], list[str]]:
    """Load ``source`` (path or mapping), unwrap checkpoint dicts and strip wrapper prefixes.

    Returns the flat ``{key: tensor}`` dict and notes on what was unwrapped or stripped.
    """
    notes: list[str] = []
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError) as err:
            raise BackboneWeightsError(
                f"cannot read {str(path)!r} as a weights file with torch.load(weights_only=True): {err}\n"
                "A checkpoint that pickles whole models or custom classes cannot be read safely; re-save its "
                "state_dict() from the program that wrote it."
            ) from err
    else:
        obj = source
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            shown = ", ".join(map(repr, list(obj)[:10]))
            raise BackboneWeightsError(
                f"found no state dict in the file: its top-level keys are {shown}; expected tensors or a "
                f"checkpoint holding one under {', '.join(map(repr, WRAPPER_KEYS))}"
            )
        notes.append(f"unwrapped checkpoint[{wrapper!r}]")
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(f"expected a state dict (a mapping of tensors), got a {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if len(state) < len(obj):
        notes.append(f"skipped {len(obj) - len(state)} non-tensor entries")
    for prefix in PREFIXES:
        if state and any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            notes.append(f"stripped the {prefix!r} prefix")
    return state, notes


def _is_state_dict(obj: Mapping) -> bool:
    values = list(obj.values())
    return bool(values) and sum(isinstance(v, Tensor) for v in values) >= max(1, len(values) // 2)


# --------------------------------------------------------------------------------------------- identification
def identify_state_dict(state: Mapping[str, Tensor]) -> tuple[str, str]:
    """``(kind, description)`` of a flat state dict.

    ``kind`` is a backbone name (``resnet50_v2``, ``resnet50``, ``vgg16_bn``, ``mobilenet_v2``) when the file holds
    that architecture, else one of ``resnet18/34``, ``resnet101``, ``resnet152``, ``vgg16``, ``svftune``,
    ``public-svf``, ``unknown``.
    """
    keys = set(state)
    if any(k.endswith((".S0", ".Vh")) for k in keys) and any(k.endswith(".base_weight") for k in keys):
        return "svftune", "a backbone already adapted with svftune (base_weight/U/S/Vh/S0 tensors)"
    if any("vector_S" in k or "conv_U" in k for k in keys):
        return "public-svf", "a checkpoint of the public SVF code with decomposed layers (conv_U/conv_V/vector_S)"
    if _has_backbone_prefix(keys):
        kind, description = identify_state_dict(_strip(state, "backbone."))
        return kind, description + ", inside a full model checkpoint (backbone.*)"
    shape = {k: tuple(v.shape) for k, v in state.items()}
    if "layer0.0.weight" in keys or "layer0.0.0.weight" in keys:
        where = "stored as layer0..layer4 (a PFENet/BAM/PSPNet-style segmentation checkpoint or this package's)"
        if "layer0.0.0.weight" in keys:
            return "mobilenet_v2", f"MobileNetV2 {where}"
        if "layer1.0.weight" in keys:
            return _vgg_kind("layer0.1.running_mean" in keys, where)
        stem = shape["layer0.0.weight"]
        if stem[-1] == 7:
            return _resnet_kind(state, "torchvision-style ResNet-{depth} (7x7 stem)", "resnet50", where)
        return _resnet_kind(state, "PSPNet deep-stem ResNet-{depth}", "resnet50_v2", where)
    if "conv1.weight" in keys:
        where = "an ImageNet classifier state dict"
        if shape["conv1.weight"][-1] == 7:
            return _resnet_kind(state, "torchvision ResNet-{depth} (7x7 stem)", "resnet50", where)
        if "conv3.weight" in keys:
            return _resnet_kind(
                state, "PSPNet deep-stem ResNet-{depth} ('resnet50_v2.pth' layout)", "resnet50_v2", where
            )
    if "features.0.0.weight" in keys:
        if shape["features.0.0.weight"][0] == 32 and "features.18.0.weight" in keys:
            return "mobilenet_v2", "torchvision MobileNetV2 ImageNet classifier state dict"
        return "unknown", "a torchvision-style network with Conv2dNormActivation blocks (not MobileNetV2)"
    if "features.0.weight" in keys:
        return _vgg_kind("features.1.running_mean" in keys, "a torchvision VGG ImageNet classifier state dict")
    sample = ", ".join(sorted(keys)[:6])
    return "unknown", f"an unrecognised state dict ({len(keys)} tensors, e.g. {sample})"


def _vgg_kind(batchnorm: bool, where: str) -> tuple[str, str]:
    return ("vgg16_bn", f"VGG16-BN, {where}") if batchnorm else ("vgg16", f"VGG16 WITHOUT BatchNorm, {where}")


def _resnet_kind(state: Mapping[str, Tensor], family: str, kind50: str, where: str) -> tuple[str, str]:
    """``family`` holds ``{depth}``, e.g. ``"torchvision ResNet-{depth} (7x7 stem)"``."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer3\.(\d+)\.", k))}
    if not any(k.startswith("layer1.0.conv3.") for k in state):
        return "resnet18/34", f"{family.format(depth='18/34')} with basic blocks, {where}"
    depth = {6: 50, 23: 101, 36: 152}.get(len(blocks))
    if depth == 50:
        return kind50, f"{family.format(depth=50)}, {where}"
    if depth is None:
        return "unknown", f"{family.format(depth='?')} with {len(blocks)} blocks in layer3, {where}"
    return f"resnet{depth}", f"{family.format(depth=depth)}, {where}"


def _has_backbone_prefix(keys) -> bool:
    return any(k.startswith("backbone.layer0.") for k in keys) and not any(k.startswith("layer0.") for k in keys)


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------- translation
def translate(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a file's keys to the :class:`Backbone` layout. Returns ``(backbone_keys, ignored_keys)``."""
    if _has_backbone_prefix(state):
        inner = _strip(state, "backbone.")
        ignored = [k for k in state if not k.startswith("backbone.")]
        out, more = translate(inner)
        return out, ignored + [f"backbone.{k}" for k in more]
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    stage_layout = "layer0.0.weight" in state or "layer0.0.0.weight" in state
    for key, value in state.items():
        new = _translate_key(key, stage_layout, state)
        if new is None:
            ignored.append(key)
        else:
            out[new] = value
    return out, ignored


def _translate_key(key: str, stage_layout: bool, state: Mapping[str, Tensor]) -> str | None:
    head, _, rest = key.partition(".")
    if re.fullmatch(r"layer[0-4]", head):
        return key
    if stage_layout:
        return None  # heads of a segmentation checkpoint, and BAM's "encoder.N" aliases of layerN
    if head in DEEP_STEM or head in TORCHVISION_STEM:
        deep = "conv3.weight" in state and state["conv1.weight"].shape[-1] == 3
        table = DEEP_STEM if deep else TORCHVISION_STEM
        return f"layer0.{table[head]}.{rest}" if head in table else key
    if head == "features":
        index_text, _, tail = rest.partition(".")
        if not index_text.isdigit():
            return key
        index = int(index_text)
        mobilenet = "features.0.0.weight" in state
        for stage, indices in enumerate(MOBILENET_V2_STAGES if mobilenet else VGG16_BN_STAGES):
            if index in indices:
                return f"layer{stage}.{index - indices.start}.{tail}"
        return None  # MobileNetV2's features.18 (1x1 conv to 1280 channels)
    if head in ("fc", "classifier"):
        return None
    return key


# --------------------------------------------------------------------------------------------- loading
def load_backbone_weights(backbone: Backbone, source: str | Path | Mapping) -> LoadReport:
    """Load ``source`` into ``backbone``, checking every key and shape; raise :class:`BackboneWeightsError`
    with a diagnosis (detected file format, missing / unexpected / mis-shaped keys, a hint) on any mismatch."""
    if backbone.strategy is not None or len(backbone.adapters):
        raise BackboneWeightsError(
            "load backbone weights before applying a fine-tuning strategy: SVF decomposes the weights it finds"
        )
    state, notes = read_state_dict(source)
    kind, description = identify_state_dict(state)
    if kind in ("svftune", "public-svf"):
        raise BackboneWeightsError(
            f"cannot load {_name(source)} into backbone {backbone.name!r}: the file holds {description}. Load the "
            "plain pretrained weights before applying SVF, or save svftune.merge_svf(model) for plain weights."
        )
    candidate, ignored = translate(state)
    target = backbone.state_dict()
    missing = [k for k in target if k not in candidate and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in candidate if k not in target]
    mis_shaped = [
        f"{k}: file {_shape(candidate[k])}, backbone {_shape(target[k])}"
        for k in candidate
        if k in target and candidate[k].shape != target[k].shape
    ]
    if missing or unexpected or mis_shaped:
        lines = [
            f"cannot load {_name(source)} into backbone {backbone.name!r} ({DESCRIPTIONS.get(backbone.name, '')}):",
            f"  the file looks like: {description}" + (f" [{'; '.join(notes)}]" if notes else ""),
        ]
        hint = HINTS.get((kind, backbone.name))
        if hint is None and kind != backbone.name and kind in DESCRIPTIONS:
            hint = f"build backbone {kind!r} for this file"
        if hint:
            lines.append(f"  hint: {hint}")
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mis_shaped)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        lines.append(f"  (the backbone has {len(target)} tensors)")
        raise BackboneWeightsError("\n".join(lines))
    merged = dict(target)
    merged.update(candidate)
    backbone.load_state_dict(merged, strict=True)
    return LoadReport(description, len(candidate), notes, ignored)


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _name(source: object) -> str:
    return repr(str(source)) if isinstance(source, (str, Path)) else "the given state dict"


__all__ = [
    "STAGES",
    "BackboneWeightsError",
    "LoadReport",
    "identify_state_dict",
    "load_backbone_weights",
    "read_state_dict",
    "translate",
]
