"""Working with Hugging Face transformers and PEFT without importing either: plain-key state dicts, a
``save_pretrained`` that writes what ``from_pretrained`` can load, and re-enabling SVF training after PEFT froze it.

An SVF model's ``state_dict()`` holds each adapted layer as ``base_weight``/``U``/``S``/``Vh``/``S0`` (that is what
``load_state_dict`` on an SVF model needs). ``from_pretrained`` knows none of those keys and would re-initialise
every adapted weight, so for transformers models (``PreTrainedModel``) ``apply_svf`` makes the instance's
``save_pretrained`` write ``merged_state_dict(model)`` instead: plain keys with the merged weights, which
``from_pretrained`` loads into the plain architecture (what a ``Trainer`` checkpoint or a final save needs).

The way back: such a model also gets a ``load_state_dict`` pre-hook that maps merged plain-key weights onto its SVF
layers (``load_merged_weights``), so ``Trainer.train(resume_from_checkpoint=...)`` and ``load_best_model_at_end``,
which call ``model.load_state_dict`` with a checkpoint's plain state dict, restore the trained singular values
instead of silently keeping the model's own. ``merge_svf``/``unapply_svf`` remove both again.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import ties
from ._values import restore
from .constants import FACTOR_OF_LETTER, HALF_DTYPES, STATE_NAMES, exact_dtype
from .errors import SVFCheckpointError
from .layers import SVFLayer

_SAVE = "save_pretrained"
READ_BACK_ULPS = 8
"""How far (relative error, Frobenius norm, in units of the weight dtype's epsilon) a merged weight may be from
``base + U diag(S - S0) Vh`` with the values read back from it: float32 rounding gives about 1e-8 (0.1 epsilon);
a weight saved from other base weights is off by far more (order 1)."""


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
            "from_pretrained loads the fine-tuned model; load_state_dict (and Trainer's resume_from_checkpoint) "
            "on the same base with SVF applied reads the singular values back (train='S', float32/float64 "
            "weights); otherwise also save them with svftune.save_svf(model, path) (see docs/howto/transformers.md)",
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


@torch.no_grad()
def values_from_merged(layer: SVFLayer, merged: Tensor, key: str = "weight") -> Tensor:
    """The singular values ``S`` for which ``layer`` applies the merged weight ``merged`` (plain layout).

    With ``U`` and ``Vh`` fixed (``train="S"``), ``merged - base_weight`` is ``U diag(S - S0) Vh``, so
    ``S - S0`` is read back as the diagonal of ``U^T (merged - base_weight) Vh^T``, in float64. Exact up to the
    rounding of ``merged`` (float32, measured on GPT-2 and BERT: 97-99% of the values bit-identical, the others
    within 2e-9); a weight equal to ``base_weight`` gives ``S0`` exactly and one equal to the layer's own merged
    weight its ``S``. Costs about two matrix products per layer, on the layer's device.

    Args:
        layer: the SVF layer.
        merged: a weight of the plain layer's shape, e.g. from a ``save_pretrained`` checkpoint.
        key: the state-dict key ``merged`` came from, for error messages.

    Returns:
        The values, in ``layer.S``'s dtype and device.

    Raises:
        SVFCheckpointError: ``merged`` has another shape, is not ``base + U diag(s) Vh`` for any ``s`` (saved from
            other base weights), or cannot be read back exactly: ``U`` or ``V`` train, or the weights are float16
            or bfloat16. Then a ``merged`` that is the layer's own merged weight (to within one epsilon of its
            dtype, relative), e.g. after ``load_svf``, is accepted and the layer keeps its values.
    """
    base = layer.base_weight
    exact, epsilon = exact_dtype(base.device), torch.finfo(base.dtype).eps
    if tuple(merged.shape) != tuple(base.shape):
        raise SVFCheckpointError(
            f"{key} has shape {tuple(merged.shape)}, but the SVF layer there has a weight of {tuple(base.shape)}"
        )
    merged = merged.to(device=base.device, dtype=base.dtype)
    own = layer.merged_weight()
    if torch.equal(merged, own):
        return layer.S.detach().clone()  # what the model already holds, bit for bit
    if layer.residual is not None or base.dtype in HALF_DTYPES:
        if _relative(own, merged, exact) <= epsilon:  # e.g. after load_svf: the same weights, to rounding
            return layer.S.detach().clone()
        why = f"train={layer.train_factors!r}" if layer.residual is not None else f"{base.dtype} weights"
        raise SVFCheckpointError(
            f"{key} is a merged weight, which cannot be mapped back to SVF values exactly with {why}. Save the SVF "
            "values with svftune.save_svf(model, path) when the checkpoint is written (e.g. in a TrainerCallback's "
            "on_save) and svftune.load_svf(model, path) before loading or resuming (docs/howto/transformers.md)"
        )
    delta = layer._matrices(merged.to(exact) - base.to(exact))
    u, vh = layer.U.to(exact), layer.Vh.to(exact)
    step = ((u.mT @ delta) * vh).sum(-1)
    values = restore(layer.S0, step, layer.S.dtype)
    rebuilt = (u * (values.to(exact) - layer.S0.to(exact)).unsqueeze(1)) @ vh
    rebuilt = (base.to(exact) + layer._from_matrices(rebuilt)).to(base.dtype)
    error = _relative(rebuilt, merged, exact)
    if not error <= READ_BACK_ULPS * epsilon:
        raise SVFCheckpointError(
            f"{key} is not a merged weight of this SVF layer: base_weight + U diag(S - S0) Vh reproduces it only to "
            f"a relative error of {error:.1e} (limit {READ_BACK_ULPS * epsilon:.1e}), so it was saved from other base "
            "weights. Apply SVF to the base model the checkpoint was trained from, or load the checkpoint into a plain "
            "model with from_pretrained"
        )
    return values


def _relative(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> float:
    expected = expected.to(dtype)
    return ((actual.to(dtype) - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def load_merged_weights(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a transformers model with SVF layers: plain merged weights become SVF values.

    For every SVF layer whose ``weight`` (or a tied holder's weight) is in ``state_dict`` while its ``S`` is not,
    the merged weight is replaced by the values ``values_from_merged`` reads back, and ``base_weight``, ``U``,
    ``Vh`` and ``S0`` by the layer's own (they do not change), so that the load neither misses nor ignores a key.
    State dicts with SVF keys load as before.

    Args:
        module: the model the hook is registered on.
        state_dict: the state dict being loaded (changed in place).
        prefix: the model's key prefix in ``state_dict``.
        *args: the rest of torch's pre-hook arguments (unused).
    """
    paths = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        paths.setdefault(id(sub), []).append(prefix + (f"{name}." if name else ""))
    for layer, places in ties.layer_places(module).values():
        heads = [prefix + f"{place}." for place in places]
        keys = [head + "weight" for head in heads]
        keys += [head + attr for holder, attr in ties.holders_of(layer) for head in paths.get(id(holder), [])]
        present = [key for key in keys if key in state_dict]
        if not present or any(head + "S" in state_dict for head in heads):
            continue
        values = values_from_merged(layer, state_dict[present[0]], present[0])
        for key in present:
            del state_dict[key]
        own = {name: tensor for name, tensor in layer.state_dict(keep_vars=False).items() if name != "S"}
        for head in heads:
            state_dict[head + "S"] = values
            for name, tensor in own.items():
                state_dict.setdefault(head + name, tensor)


def _has_load_hook(module: nn.Module) -> bool:
    return any(getattr(h, "hook", h) is load_merged_weights for h in module._load_state_dict_pre_hooks.values())


def after_apply(model: nn.Module) -> None:
    """Called by ``apply_svf``: every transformers model in ``model`` (itself, or the one a PEFT model wraps)
    gets a ``save_pretrained`` that writes merged, plain-key weights and a ``load_state_dict`` pre-hook that maps
    them back (``load_merged_weights``)."""
    for module in model.modules():
        if _is_transformers_model(module):
            if _SAVE not in module.__dict__:
                module.__dict__[_SAVE] = types.MethodType(_save_pretrained, module)
            if not _has_load_hook(module):
                module.register_load_state_dict_pre_hook(load_merged_weights)


def after_remove(model: nn.Module) -> None:
    """Called by ``merge_svf``/``unapply_svf``: the class's own ``save_pretrained`` again, and no load hook."""
    for module in model.modules():
        method = module.__dict__.get(_SAVE)
        if isinstance(method, types.MethodType) and method.__func__ is _save_pretrained:
            del module.__dict__[_SAVE]
        hooks = module._load_state_dict_pre_hooks
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is load_merged_weights]:
            del hooks[key]


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
