"""The PEFT verbs, for users coming from PEFT: ``add_adapter``, ``merge_adapter`` / ``unmerge_adapter``,
``get_base_model``.

- ``add_adapter(model, name)``: a new, untrained adapter (``S == S0``) next to the loaded ones
  (``svftune.set_adapter`` switches to it; training then changes it).
- ``merge_adapter(model)``: every SVF layer is swapped, in place, for a plain layer carrying the merged weight
  (plain-layer speed, e.g. for evaluation); ``unmerge_adapter(model)`` puts the very same SVF layers back, so
  training continues exactly where it was. ``merge_svf`` is the one-way version.
- ``get_base_model(model)``: the plain model with the original weights, without touching ``model`` (the base
  weights are shared, not copied). For a PEFT model, PEFT's own ``get_base_model()`` unwraps it first.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import ties
from .adapters import Adapter, register_adapter
from .model import _require_svf, _set_submodule, svf_layers, unapply_svf

_STASH = "_svf_unmerged"  # on a plain layer's __dict__ while merged: the SVF layer it stands for


def add_adapter(model: nn.Module, name: str) -> None:
    """Add an untrained adapter ``name`` (every singular value at its initial value); the active one stays.

    Args:
        model: a model with SVF applied.
        name: the new adapter's name (one that exists is replaced).

    Raises:
        ValueError: the model has no SVF layers.
        TypeError: ``name`` is not a non-empty string.

    Examples:
        >>> from torch import nn
        >>> import svftune
        >>> model = svftune.apply_svf(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> svftune.add_adapter(model, "task_a")
        >>> svftune.list_adapters(model), svftune.active_adapter(model)
        (['task_a'], None)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"add_adapter: name={name!r} must be a non-empty string")
    _require_svf(model, "add_adapter")
    deltas = {lname: torch.zeros_like(layer.S.detach()) for lname, layer in svf_layers(model)}
    register_adapter(model, Adapter(name, deltas, source="add_adapter"), activate=False)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Swap every SVF layer for a plain layer with the merged weight, in place; ``unmerge_adapter`` undoes it.

    Args:
        model: a model with SVF applied.

    Returns:
        ``model``.

    Raises:
        ValueError: the model has no SVF layers (nothing to merge, or already merged).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> model = svftune.apply_svf(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> layer = model[2]
        >>> _ = svftune.merge_adapter(model)
        >>> type(model[2]).__name__, svftune.unmerge_adapter(model)[2] is layer
        ('Linear', True)
    """
    _require_svf(model, "merge_adapter")
    for layer, paths in ties.layer_places(model).values():
        plain = layer.to_plain(merge=True)
        plain.requires_grad_(False)
        plain.__dict__[_STASH] = layer
        for path in paths:
            _set_submodule(model, path, plain)
        for holder, attr in ties.holders_of(layer):  # tied holders keep reading the layer's weight: same values
            holder.__dict__[attr] = plain.weight
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Put back the SVF layers that ``merge_adapter`` swapped out (the same objects: exactly as before).

    Args:
        model: a model after ``merge_adapter``.

    Returns:
        ``model``.

    Raises:
        ValueError: nothing was merged with ``merge_adapter``.
    """
    merged = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if _STASH in m.__dict__]
    if not merged:
        raise ValueError("unmerge_adapter: nothing is merged; call svftune.merge_adapter(model) first")
    for name, plain in merged:
        _set_submodule(model, name, plain.__dict__[_STASH])
    return model


def get_base_model(model: nn.Module) -> nn.Module:
    """The plain model with the original weights, leaving ``model`` as it is.

    A copy whose adapted layers are the original plain layers; the original weight tensors (frozen inside the SVF
    layers) are shared with ``model``, not copied. A PEFT model is unwrapped with its ``get_base_model()`` first.

    Args:
        model: a model with SVF applied (or a PEFT model wrapping one).

    Returns:
        The plain model.

    Raises:
        ValueError: the model has no SVF layers.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> model = svftune.apply_svf(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> base = svftune.get_base_model(model)
        >>> shared = base[2].weight.data_ptr() == model[2].base_weight.data_ptr()
        >>> type(base[2]).__name__, shared, type(model[2]).__name__, model[2].base_weight.requires_grad
        ('Linear', True, 'SVFLinear', False)
    """
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    _require_svf(inner, "get_base_model")
    memo = {}  # new Parameter objects on the same storage: shared values, their own requires_grad
    for _, layer in svf_layers(inner):
        memo[id(layer.base_weight)] = nn.Parameter(layer.base_weight.detach(), requires_grad=False)
    return unapply_svf(copy.deepcopy(inner, memo))
