"""``load_svf``: plan (compare the checkpoint with the model, changing nothing), apply, and roll back on failure."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import fingerprint as fp
from ..adapters import adapter_from_checkpoint, register_adapter
from ..errors import SVFCheckpointError
from ..layers import SVFLayer, normalize_train, unsupported_reason
from ..model import apply_svf, svf_layers, unapply_svf
from .format import KINDS_REGISTRY, SHOWN, SVFCheckpoint, kind_of_layer
from .modules import module_tensors
from .modules import problems as module_problems
from .read import read_svf


def load_svf(
    model: nn.Module,
    source: str | os.PathLike | SVFCheckpoint,
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    revision: str | None = None,
    adapter_name: str = "default",
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Apply SVF to ``model`` as the checkpoint was trained and load its singular-value changes.

    Args:
        model: the plain base model, or one with SVF already applied to the same layers.
        source: a ``.safetensors`` file, a checkpoint directory, a Hub repo id ``"user/name"``, or an
            ``SVFCheckpoint`` from ``read_svf``.
        strict: ``True`` (default): every layer must exist with the same shape and the same base weights
            (bit-identical, the same values in another dtype, or the same weights rounded to another dtype),
            otherwise ``SVFCheckpointError`` names the first differing layers. ``False``: load the layers
            that match, warn about the others (for deliberate transfer to another, e.g. fine-tuned, base).
        device: move the model there after loading (``None``: leave it where it is).
        revision: Hub branch, tag or commit when ``source`` is a repo id.
        adapter_name: the name this checkpoint gets among the model's adapters (see ``svftune.adapters``);
            loading under an existing name replaces that adapter.
        cache_dir: opt-in on-disk cache of the decompositions, keyed by the base weights' fingerprint: a second
            load of the same base skips the SVDs (see ``svftune.cache``).

    Returns:
        ``model`` (modified in place). On any error the model is left exactly as it was.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        SVFCheckpointError: the checkpoint cannot be read, or does not fit the model (``strict=True``: any
            difference; ``strict=False``: no layer matches), or ``adapter_name`` is empty. The message lists the
            differing layers.
        ImportError: ``source`` is a Hub repo id and ``huggingface_hub`` is not installed.

    Warns:
        UserWarning: ``strict=False`` skipped layers that differ, or base weights match only within rounding
            (e.g. a base re-saved in float16).

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> def base():
        ...     torch.manual_seed(0)
        ...     return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> trained = svftune.apply_svf(base())
        >>> with torch.no_grad():
        ...     _ = trained[2].S.mul_(1.5)  # stands in for training
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = svftune.save_svf(trained, os.path.join(tmp.name, "svf.safetensors"))
        >>> model = svftune.load_svf(base(), path)  # applies SVF as it was trained, then loads the values
        >>> type(model[2]).__name__, svftune.trainable_parameters(model)
        ('SVFConv2d', (12, 272))
        >>> x = torch.randn(1, 3, 6, 6)
        >>> with torch.no_grad():
        ...     torch.allclose(model(x), trained(x), atol=1e-6)
        True
        >>> other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))  # other weights
        >>> svftune.load_svf(other, path)
        Traceback (most recent call last):
            ...
        svftune.errors.SVFCheckpointError: checkpoint ... does not fit this model (2 difference(s)): ...
        >>> tmp.cleanup()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_svf expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise SVFCheckpointError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    checkpoint = source if isinstance(source, SVFCheckpoint) else read_svf(source, revision=revision)
    plan = check_model(model, checkpoint, strict=strict)
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    modes = {name: module.training for name, module in model.named_modules()}
    whole = module_tensors(model, list(checkpoint.modules))
    saved_state = {(m, k): t.detach().clone() for m, state in whole.items() for k, t in state.items()}
    applied = False
    try:
        if plan.plain:
            _apply_for_checkpoint(model, checkpoint, plan, cache_dir)
            applied = True
        adapter = adapter_from_checkpoint(model, checkpoint, plan, adapter_name)
        register_adapter(model, adapter)
        with torch.no_grad():
            for module, state in checkpoint.modules.items():
                for key, value in state.items():
                    whole[module][key].copy_(value)
    except BaseException:
        with torch.no_grad():
            for (module, key), value in saved_state.items():
                whole[module][key].copy_(value)
        if applied or (plan.plain and svf_layers(model)):
            unapply_svf(model)
            model.__dict__.pop("svf_adapters", None)
        for parameter, requires_grad in flags.values():
            parameter.requires_grad_(requires_grad)
        for name, module in model.named_modules():
            if name in modes:
                module.training = modes[name]
        raise
    if device is not None:
        model.to(device)
    return model


@dataclass
class LoadPlan:
    """What ``check_model`` found: which layers load, and how each base weight matched.

    Attributes:
        plain: whether the model had no SVF layer (``load_svf`` then applies SVF itself).
        loadable: names of the layers that load.
        match: per loadable layer, ``"exact"`` (bit-identical base), ``"same values"`` (the same values in another
            dtype) or ``"close"`` (equal within rounding to another dtype).
        hashes: per checked layer, the sha256 fingerprint of the model's base weight.
        problems: ``"name: reason"`` for every difference found.
        extra: names of the stored extra parameters that load.
    """

    plain: bool
    loadable: list[str]
    match: dict[str, str]  # layer -> "exact" | "same values" | "close"
    hashes: dict[str, str]  # layer -> sha256 of the model's base weight
    problems: list[str]
    extra: list[str]


def check_model(model: nn.Module, checkpoint: SVFCheckpoint, *, strict: bool = True) -> LoadPlan:
    """Compare a checkpoint with a model without changing it.

    Args:
        model: the model ``load_svf`` would load onto (plain, or with SVF applied).
        checkpoint: the checkpoint to compare.
        strict: raise on any difference (``True``), or warn and plan to load the matching layers only.

    Returns:
        The plan: which layers load and how each base weight matched.

    Raises:
        SVFCheckpointError: a difference with ``strict=True``, no loadable layer at all, or the model's SVF layers
            train other factors than the checkpoint's.
    """
    existing = dict(svf_layers(model))
    plain = not existing
    config = checkpoint.config
    problems: list[tuple[str, str]] = []
    if not plain:
        trains = {layer.train_factors for layer in existing.values()}
        if trains != {normalize_train(config["train"])}:
            raise SVFCheckpointError(
                f"the model has SVF applied with train={sorted(trains)}, the checkpoint was trained with "
                f"train={config['train']!r}; call svftune.unapply_svf(model) first and load onto the plain model"
            )
    modules = dict(model.named_modules())
    loadable, match, hashes = [], {}, {}
    for name, entry in checkpoint.layers.items():
        module = modules.get(name)
        if module is None:
            problems.append((name, "missing from the model"))
            continue
        kind = KINDS_REGISTRY[entry.kind]
        base_type = kind.plain_class()
        if plain:
            if base_type is None:
                problems.append((name, f"is a {entry.kind} in the checkpoint, whose library is not loaded"))
                continue
            if isinstance(module, SVFLayer) or not isinstance(module, base_type):
                problems.append((name, f"is a {type(module).__name__} in the model, the checkpoint has a {entry.kind}"))
                continue
            reason = unsupported_reason(module)
            if reason is not None:
                problems.append((name, f"cannot be adapted: it {reason}"))
                continue
            weight, groups = module.weight, getattr(module, "groups", 1)
        elif not isinstance(module, SVFLayer) or kind_of_layer(module) != entry.kind:
            plain_match = base_type is not None and isinstance(module, base_type) and not isinstance(module, SVFLayer)
            what = "is not adapted" if plain_match else f"is a {type(module).__name__}"
            problems.append((name, f"{what} in the model, the checkpoint has an SVF {entry.kind} there"))
            continue
        else:
            weight, groups = module.base_weight, module.groups
        if list(weight.shape) != entry.shape or groups != entry.groups:
            problems.append(
                (
                    name,
                    f"weight shape {_shape(weight.shape)} groups={groups} in the model, "
                    f"{_shape(entry.shape)} groups={entry.groups} in the checkpoint",
                )
            )
            continue
        sha = fp.weight_sha256(weight)
        hashes[name] = sha
        if sha == entry.sha256:
            match[name] = "exact"
        elif fp.same_values(weight, entry.sha256, entry.dtype):
            match[name] = "same values"
        else:
            distance = fp.sketch_distance(weight.numel(), entry.fro, entry.sketch, fp.weight_sketch(weight))
            if distance > fp.SKETCH_TOLERANCE:
                problems.append(
                    (
                        name,
                        f"other base weights (sha256 {sha[:12]} in the model, {entry.sha256[:12]} in the "
                        f"checkpoint; random projections differ by {distance:.3g}, more than rounding to another "
                        f"dtype would, tolerance {fp.SKETCH_TOLERANCE})",
                    )
                )
                continue
            match[name] = "close"
        loadable.append(name)
    if not plain:
        problems += [
            (name, "is adapted in the model but not in the checkpoint")
            for name in existing
            if name not in checkpoint.layers
        ]
    problems += module_problems(model, checkpoint.modules)
    parameters = dict(model.named_parameters())
    extra = []
    for pname, tensor in checkpoint.extra.items():
        parameter = parameters.get(pname)
        if parameter is None:
            problems.append((pname, "trained parameter stored in the checkpoint is missing from the model"))
        elif tuple(parameter.shape) != tuple(tensor.shape):
            problems.append(
                (
                    pname,
                    f"trained parameter has shape {_shape(parameter.shape)} in the model, "
                    f"{_shape(tensor.shape)} in the checkpoint",
                )
            )
        else:
            extra.append(pname)

    if problems:
        listed = "\n".join(f"  {name}: {reason}" for name, reason in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        head = f"checkpoint {checkpoint.source} does not fit this model ({len(problems)} difference(s)):\n"
        if strict or not loadable:
            advice = (
                "Load it onto the base model it was trained on, or pass strict=False to load only the matching "
                "layers (for deliberate transfer to another base)."
                if loadable
                else "No layer matches: this checkpoint belongs to another model."
            )
            raise SVFCheckpointError(head + listed + more + "\n" + advice)
        warnings.warn(head + listed + more + "\nstrict=False: loading the matching layers only.", stacklevel=3)
    close = [name for name in loadable if match[name] == "close"]
    if close:
        warnings.warn(
            f"the base weights of {len(close)} layer(s) ({', '.join(close[:SHOWN])}) are not bit-identical to the "
            "checkpoint's but equal within rounding (e.g. re-saved in float16/bfloat16): outputs differ from the "
            "trained model by that rounding",
            stacklevel=3,
        )
    return LoadPlan(plain, loadable, match, hashes, [f"{n}: {r}" for n, r in problems], extra)


def _apply_for_checkpoint(model: nn.Module, checkpoint: SVFCheckpoint, plan: LoadPlan, cache_dir: Any) -> None:
    """apply_svf with the checkpoint's configuration on exactly the loadable layers (optionally cached SVDs)."""
    config = checkpoint.config
    names = set(plan.loadable)
    kwargs = {
        "layers": lambda name, module: name in names,
        "train": config["train"],
        "form": config["form"],
        "freeze_bn": config["freeze_bn"],
        "freeze_others": config["freeze_others"],
        "tied": config.get("tied", "error"),
    }
    if checkpoint.modules:
        kwargs["modules_to_save"] = list(checkpoint.modules)
    modules = dict(model.named_modules())
    modes = {name: modules[name].training for name in plan.loadable}
    if cache_dir is None:
        apply_svf(model, **kwargs)
    else:
        from ..cache import DecompositionCache

        cache = DecompositionCache(cache_dir)
        weights = {modules[name].weight.data_ptr(): plan.hashes[name] for name in plan.loadable}
        full = "U" in config["train"] or "V" in config["train"]
        apply_svf(model, **kwargs, decompose=cache.provider(weights, float64=full))
    for name, layer in svf_layers(model):  # an SVF layer starts in training mode; keep the replaced layer's mode
        if name in modes:
            layer.train(modes[name])


def _shape(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape)
