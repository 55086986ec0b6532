"""Working with Hugging Face transformers and PEFT without importing either: plain-key state dicts, a
``save_pretrained`` that writes what ``from_pretrained`` can load, and re-enabling SVF training after PEFT froze it.

An SVF model's ``state_dict()`` holds each adapted layer as ``base_weight``/``U``/``S``/``Vh``/``S0`` (that is what
``load_state_dict`` on an SVF model needs). ``from_pretrained`` knows none of those keys and would re-initialise
every adapted weight, so for transformers models (``PreTrainedModel``) ``apply_svf`` makes the instance's
``save_pretrained`` write ``merged_state_dict(model)`` instead: plain keys with the merged weights, which
``from_pretrained`` loads into the plain architecture (what a ``Trainer`` checkpoint or a final save needs).
``merge_svf``/``unapply_svf`` remove that again.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

from torch import Tensor, nn

from . import ties
from .constants import FACTOR_OF_LETTER, STATE_NAMES
from .layers import SVFLayer

_SAVE = "save_pretrained"


class SVFSaveWarning(UserWarning):
    """``save_pretrained`` on a model with SVF layers wrote merged weights (plain keys) instead of SVF factors."""


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in type(model).__mro__)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every SVF layer written as its plain layer: ``weight`` (merged) and ``bias``.

    Plain keys, as the model had before ``apply_svf``: give it to ``save_pretrained(..., state_dict=...)``,
    ``torch.save`` or ``load_state_dict`` of the plain architecture. The model itself is not changed. Weights
    shared with ``tied="keep"`` are one merged tensor under every name, as a tied plain model has them.

    Args:
        model: a model with or without SVF layers (without: its ``state_dict()``).

    Returns:
        The state dict; merged weights are rebuilt in float64 (float32 without float64) and rounded once, like
        ``merge_svf``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> model = svftune.apply_svf(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> with torch.no_grad():
        ...     _ = model[2].S.mul_(1.5)  # stands in for training
        >>> state = svftune.merged_state_dict(model)
        >>> sorted(state)
        ['0.bias', '0.weight', '2.bias', '2.weight']
        >>> plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> plain.load_state_dict(state)
        <All keys matched successfully>
    """
    state = model.state_dict()
    paths = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    for layer, places in ties.layer_places(model).values():
        merged = layer.merged_weight()
        for place in places:
            prefix = f"{place}." if place else ""
            for key in STATE_NAMES:
                if key != "bias":
                    state.pop(prefix + key, None)
            state[prefix + "weight"] = merged
        for holder, attr in ties.holders_of(layer):
            for place in paths.get(id(holder), []):
                prefix = f"{place}." if place else ""
                state[prefix + attr] = merged
    return state


def _has_svf_keys(model: nn.Module, state: dict[str, Any]) -> bool:
    places = [p for _, paths in ties.layer_places(model).values() for p in paths]
    return any(f"{p}.S0" in state or f"{p}.base_weight" in state for p in places)


def _save_pretrained(self: nn.Module, save_directory, *args: Any, state_dict: dict | None = None, **kwargs: Any):
    """``save_pretrained`` of a transformers model with SVF layers: writes the merged weights under plain keys."""
    if ties.layer_places(self) and (state_dict is None or _has_svf_keys(self, state_dict)):
        warnings.warn(
            "save_pretrained on a model with SVF layers writes the merged weights under the plain keys, so that "
            "from_pretrained loads the fine-tuned model; to keep training SVF later, also save its values with "
            "svftune.save_svf(model, path) (see docs/howto/transformers.md)",
            SVFSaveWarning,
            stacklevel=2,
        )
        merged = merged_state_dict(self)
        if state_dict is not None:  # what the caller passed for everything else
            kept = {k: v for k, v in state_dict.items() if k not in merged and not _is_svf_key(self, k)}
            merged = {**kept, **merged}
        state_dict = merged
    return type(self).save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)


def _is_svf_key(model: nn.Module, key: str) -> bool:
    prefix, _, last = key.rpartition(".")
    if last not in STATE_NAMES or last == "bias":
        return False
    try:
        return isinstance(model.get_submodule(prefix), SVFLayer)
    except AttributeError:
        return False


def after_apply(model: nn.Module) -> None:
    """Called by ``apply_svf``: every transformers model in ``model`` (itself, or the one a PEFT model wraps)
    gets a ``save_pretrained`` that writes merged, plain-key weights."""
    for module in model.modules():
        if _is_transformers_model(module) and _SAVE not in module.__dict__:
            module.__dict__[_SAVE] = types.MethodType(_save_pretrained, module)


def after_remove(model: nn.Module) -> None:
    """Called by ``merge_svf``/``unapply_svf``: the class's own ``save_pretrained`` again."""
    for module in model.modules():
        method = module.__dict__.get(_SAVE)
        if isinstance(method, types.MethodType) and method.__func__ is _save_pretrained:
            del module.__dict__[_SAVE]


def enable_svf_training(model: nn.Module) -> int:
    """Make the SVF factors and the ``modules_to_save`` of ``model`` trainable again, after PEFT froze them.

    ``peft.get_peft_model`` sets ``requires_grad=False`` on every parameter that is not its own adapter's,
    the singular values included. Call this right after it (on the PEFT model or the model inside it).

    Args:
        model: a model with SVF layers, possibly wrapped by PEFT.

    Returns:
        How many tensors were made trainable.

    Raises:
        ValueError: the model has no SVF layers.
    """
    places = ties.layer_places(model)
    if not places:
        raise ValueError("enable_svf_training: the model has no SVF layers; call svftune.apply_svf(model) first")
    count = 0
    for layer, _ in places.values():
        for letter in layer.train_factors:
            getattr(layer, FACTOR_OF_LETTER[letter]).requires_grad_(True)
            count += 1
    for module in model.modules():
        config = module.__dict__.get("svf_config")
        for saved in config.modules_to_save if config is not None else []:
            for parameter in module.get_submodule(saved).parameters():
                count += not parameter.requires_grad
                parameter.requires_grad_(True)
    return count
