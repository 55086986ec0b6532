"""Several SVF checkpoints ("adapters") on one base model: load under names, switch, run the plain base, mix.

All adapters share one decomposition of the base: switching writes another adapter's singular-value changes
(and, for tied singular values, its stored basis vectors) into the SVF layers, with no new SVD. The values in
the layers belong to the active adapter: training changes it, and switching away keeps those changes in it.

Mixing builds a new adapter whose change is the weighted sum of the adapters' changes (as Transformer-squared
mixes its task vectors). For distinct singular values that is the weighted sum of the ``S - S0`` vectors. Inside
a run of tied values the adapters may use different bases; there the weighted sum of their changes is
re-diagonalised inside the run's subspace (an eigendecomposition for non-zero runs, which keeps
``U diag(S0) Vh = W`` as the paper's three-op training form needs; an SVD for zero runs), so the mixed weight is
exactly ``W + sum_k w_k (W_k - W)``.

    svftune.load_svf(model, "ckpt_a", adapter_name="a")
    svftune.load_svf(model, "ckpt_b", adapter_name="b")   # same base, no new decomposition
    svftune.set_adapter(model, "a")
    with svftune.disable_adapter(model):
        base_out = model(x)                                  # the plain base model
    svftune.mix_adapters(model, {"a": 0.5, "b": 0.5}, name="ab")

Errors of these functions (unknown or missing adapters, bad mix weights) are ``svftune.errors.SVFAdapterError``, a
subclass of ``SVFCheckpointError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._values import change, keep_precision, restore
from .constants import exact_dtype
from .errors import SVFAdapterError
from .fingerprint import is_null_group
from .model import svf_layers

if TYPE_CHECKING:
    from .checkpoint.format import SVFCheckpoint
    from .checkpoint.load import LoadPlan

Run = tuple[int, int, int, Tensor, Tensor]  # (group, start, stop, U columns, Vh rows)


@dataclass
class Adapter:
    """One adapter's values, on the layers' devices and dtypes.

    Attributes:
        name: the adapter's name.
        deltas: per layer, the ``(groups, rank)`` change of its singular values, ``S - S0``.
        bases: per layer, the tied runs ``(group, start, stop, U columns, Vh rows)`` it writes into the layer.
        factors: per layer that trained ``U`` or ``V``, its whole ``(U, Vh)``.
        extra: other trained parameters by name.
        source: where it came from (a checkpoint path, or a description of a mix).
    """

    name: str
    deltas: dict[str, Tensor]  # layer -> (groups, rank) S - S0
    bases: dict[str, list[Run]] = field(default_factory=dict)
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # U/V-trained layers: full U, Vh
    extra: dict[str, Tensor] = field(default_factory=dict)  # other trained parameters
    source: str = ""


@dataclass
class AdapterSet:
    """The adapters of one model (``model.svf_adapters``) and what the plain base had where they write.

    Attributes:
        adapters: the adapters by name, in loading order.
        active: the name of the adapter whose values are in the layers, or ``None`` for the plain base.
        base_columns: the base's own ``(U columns, Vh rows)`` of every tied run an adapter overwrote, keyed by
            ``(layer, group, start, stop)``.
        base_factors: the base's own ``(U, Vh)`` of layers whose factors an adapter replaced.
        base_extra: the base's own values of the extra parameters that adapters set.
    """

    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: str | None = None
    base_columns: dict[tuple[str, int, int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
    base_factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    base_extra: dict[str, Tensor] = field(default_factory=dict)


def _error(message: str) -> Exception:
    return SVFAdapterError(message)


def _adapter_set(model: nn.Module, create: bool = False) -> AdapterSet | None:
    adapters = model.__dict__.get("svf_adapters")
    if adapters is not None and not svf_layers(model):  # SVF was removed (merge/unapply): forget them
        model.__dict__.pop("svf_adapters")
        adapters = None
    if adapters is None and create:
        adapters = AdapterSet()
        model.__dict__["svf_adapters"] = adapters
    return adapters


def _require(model: nn.Module, *names: str) -> AdapterSet:
    adapters = _adapter_set(model)
    if adapters is None or not adapters.adapters:
        raise _error("the model has no adapters: load one with svftune.load_svf(model, source, adapter_name=...)")
    for name in names:
        if name not in adapters.adapters:
            known = ", ".join(repr(n) for n in adapters.adapters)
            raise _error(f"unknown adapter {name!r}; the model has {known}")
    return adapters


def adapter_from_checkpoint(model: nn.Module, checkpoint: SVFCheckpoint, plan: LoadPlan, name: str) -> Adapter:
    """Build an adapter from the checkpoint's values for the layers in ``plan``.

    Args:
        model: the model with SVF applied to (at least) the layers in ``plan.loadable``.
        checkpoint: the checkpoint to take the values from.
        plan: what ``svftune.checkpoint.check_model`` found loadable.
        name: the adapter's name.

    Returns:
        The adapter, its tensors moved to the layers' devices and dtypes.

    Raises:
        SVFAdapterError: ``name`` is not a non-empty string.
    """
    if not isinstance(name, str) or not name:
        raise _error(f"adapter_name must be a non-empty string, got {name!r}")
    layers = dict(svf_layers(model))
    adapter = Adapter(name, {}, source=checkpoint.source)
    for lname in plan.loadable:
        layer = layers[lname]
        adapter.deltas[lname] = keep_precision(checkpoint.deltas[lname], layer.S)
        u_like = layer.U
        if lname in checkpoint.factors:
            u, vh = checkpoint.factors[lname]
            adapter.factors[lname] = (u.to(u_like.device, u_like.dtype), vh.to(u_like.device, layer.Vh.dtype))
        runs = checkpoint.bases.get(lname, [])
        adapter.bases[lname] = [
            (g, a, b, u.to(u_like.device, u_like.dtype), vh.to(u_like.device, layer.Vh.dtype))
            for g, a, b, u, vh in runs
        ]
    parameters = dict(model.named_parameters())
    for pname in plan.extra:
        parameter = parameters[pname]
        adapter.extra[pname] = checkpoint.extra[pname].to(parameter.device, parameter.dtype)
    return adapter


def register_adapter(model: nn.Module, adapter: Adapter, *, activate: bool = True) -> None:
    """Add ``adapter`` to the model (replacing one of the same name) and, by default, make it active.

    Args:
        model: a model with SVF applied.
        adapter: the adapter to add.
        activate: write its values into the layers now. An adapter that replaces the active one is always
            activated.
    """
    adapters = _adapter_set(model, create=True)
    if adapters.active is not None and adapters.active != adapter.name:
        _sync(model, adapters)
    adapters.adapters[adapter.name] = adapter
    if activate or adapters.active == adapter.name:
        _activate(model, adapters, adapter.name)
        parameters = dict(model.named_parameters())
        for pname in adapter.extra:  # they trained: keep them trainable, as in the trained model
            parameters[pname].requires_grad_(True)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters loaded onto ``model``, in loading order.

    Args:
        model: any model.

    Returns:
        The names (empty when no adapter was loaded, or after ``merge_svf`` / ``unapply_svf``).

    Examples:
        See ``set_adapter``, whose example loads two adapters and lists them.
    """
    adapters = _adapter_set(model)
    return list(adapters.adapters) if adapters else []


def active_adapter(model: nn.Module) -> str | None:
    """The adapter whose values are in the layers.

    Args:
        model: any model.

    Returns:
        The active adapter's name; ``None`` for the plain base (inside ``disable_adapter``, or after the
        active adapter was deleted) or when no adapter is loaded. The last one loaded is active.
    """
    adapters = _adapter_set(model)
    return adapters.active if adapters else None


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one.

    Nothing is decomposed: the adapter's singular-value changes (and stored tie bases) are written into the SVF
    layers. The values currently in the layers, including any training since the last switch, are kept in the
    previously active adapter first.

    Args:
        model: a model with adapters loaded by ``svftune.load_svf``.
        name: the adapter to activate.

    Raises:
        SVFAdapterError: the model has no adapters, or none named ``name``.

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> def base():
        ...     torch.manual_seed(0)
        ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for name, scale in [("a", 1.2), ("b", 1.4)]:  # two "trained" checkpoints of the same base
        ...     trained = svftune.apply_svf(base())
        ...     with torch.no_grad():
        ...         _ = trained[0].S.mul_(scale)
        ...     _ = svftune.save_svf(trained, os.path.join(tmp.name, f"{name}.safetensors"))
        >>> model = base()
        >>> _ = svftune.load_svf(model, os.path.join(tmp.name, "a.safetensors"), adapter_name="a")
        >>> _ = svftune.load_svf(model, os.path.join(tmp.name, "b.safetensors"), adapter_name="b")
        >>> svftune.list_adapters(model), svftune.active_adapter(model)  # the last one loaded is active
        (['a', 'b'], 'b')
        >>> svftune.set_adapter(model, "a")
        >>> svftune.active_adapter(model), torch.allclose(model[0].S, 1.2 * model[0].S0)
        ('a', True)
        >>> tmp.cleanup()
    """
    adapters = _require(model, name)
    _sync(model, adapters)
    _activate(model, adapters, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Forget adapter ``name``; deleting the active one leaves the plain base in the layers.

    Args:
        model: a model with adapters loaded.
        name: the adapter to delete.

    Raises:
        SVFAdapterError: the model has no adapters, or none named ``name``.
    """
    adapters = _require(model, name)
    if adapters.active == name:
        _activate(model, adapters, None)
    del adapters.adapters[name]


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager that runs the plain base model inside the ``with`` block, then switches back.

    Inside the block every SVF layer holds exactly its original weight; on leaving it, the adapter that was
    active (with any training done so far) is back. It also works without loaded adapters, on a model trained
    after ``svftune.apply_svf``, unless its layers train ``U`` or ``V``.

    Args:
        model: a model with SVF applied.

    Yields:
        ``model`` itself.

    Raises:
        SVFAdapterError: the layers train ``U`` or ``V`` and their values were not loaded with ``load_svf``,
            so the base cannot be restored.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> def base():
        ...     torch.manual_seed(0)
        ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model = svftune.apply_svf(base())
        >>> with torch.no_grad():
        ...     _ = model[0].S.mul_(2.0)  # stands in for training
        ...     x = torch.randn(3, 4)
        ...     with svftune.disable_adapter(model):
        ...         plain = model(x)
        ...     tuned = model(x)
        >>> torch.equal(plain, base()(x)), torch.allclose(tuned, plain)
        (True, False)
    """
    adapters = _adapter_set(model)
    if adapters is None:  # SVF applied but nothing loaded: S may still have been trained
        if any(layer.residual is not None for _, layer in svf_layers(model)):
            raise _error(
                "disable_adapter cannot restore the base of layers that train U or V unless their values were "
                "loaded with svftune.load_svf; use svftune.unapply_svf on a copy of the model instead"
            )
        adapters = _adapter_set(model, create=True)
        adapters.adapters["__trained__"] = Adapter("__trained__", {})
        adapters.active = "__trained__"
    previous = adapters.active
    _sync(model, adapters)
    _activate(model, adapters, None)
    try:
        yield model
    finally:
        _activate(model, adapters, previous)
        if previous == "__trained__":
            model.__dict__.pop("svf_adapters", None)


def mix_adapters(model: nn.Module, weights: Mapping[str, float], *, name: str = "mix") -> None:
    """Add and activate a new adapter ``name`` whose weight change is the weighted sum of other adapters' changes.

    The mixed weight of every layer is exactly ``W + sum_k weights[k] * (W_k - W)``: for distinct singular values
    the ``S - S0`` vectors are summed; inside runs of tied values the mix is re-diagonalised in the run's
    subspace (see the module documentation). Extra trained parameters are mixed the same way. Weights need not
    sum to one (``{"a": 2.0}`` doubles an adapter's change; negative weights subtract).

    Args:
        model: a model with adapters loaded.
        weights: ``{adapter name: weight}``.
        name: the new adapter's name; an existing adapter of that name is replaced.

    Raises:
        SVFAdapterError: ``weights`` is empty or not a mapping, names an unknown adapter, holds a weight that
            is not a number, or names an adapter that trained ``U`` or ``V`` (whose changes are not singular
            values).

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> def base():
        ...     torch.manual_seed(0)
        ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for name, scale in [("a", 1.2), ("b", 1.4)]:  # two "trained" checkpoints of the same base
        ...     trained = svftune.apply_svf(base())
        ...     with torch.no_grad():
        ...         _ = trained[0].S.mul_(scale)
        ...     _ = svftune.save_svf(trained, os.path.join(tmp.name, f"{name}.safetensors"))
        >>> model = base()
        >>> _ = svftune.load_svf(model, os.path.join(tmp.name, "a.safetensors"), adapter_name="a")
        >>> _ = svftune.load_svf(model, os.path.join(tmp.name, "b.safetensors"), adapter_name="b")
        >>> svftune.mix_adapters(model, {"a": 0.5, "b": 0.5}, name="ab")
        >>> svftune.list_adapters(model), svftune.active_adapter(model)
        (['a', 'b', 'ab'], 'ab')
        >>> torch.allclose(model[0].S, 1.3 * model[0].S0)  # halfway between 1.2 and 1.4
        True
        >>> tmp.cleanup()
    """
    if not isinstance(weights, Mapping) or not weights:
        raise _error("mix_adapters needs a mapping {adapter name: weight}, e.g. {'a': 0.5, 'b': 0.5}")
    adapters = _require(model, *weights)
    for key, weight in weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight != weight:
            raise _error(f"mix weight of {key!r} must be a number, got {weight!r}")
    chosen = [(float(w), adapters.adapters[k]) for k, w in weights.items()]
    trained_bases = [a.name for _, a in chosen if a.factors]
    if trained_bases:
        raise _error(f"cannot mix {trained_bases}: they trained U or V, so their changes are not singular values")
    _sync(model, adapters)
    _activate(model, adapters, None)  # the layers now hold the base's own singular vectors
    mixed = Adapter(name, {}, source="mix of " + ", ".join(f"{w:g} x {a.name}" for w, a in chosen))
    with torch.no_grad():
        for lname, layer in svf_layers(model):
            present = [(w, a) for w, a in chosen if lname in a.deltas]
            if not present:
                continue
            exact = exact_dtype(layer.S.device)
            delta = sum(w * a.deltas[lname].to(layer.S.device, exact) for w, a in present)
            runs = []
            for group in range(layer.groups):
                for start, stop in _merged_runs(group, [a.bases.get(lname, []) for _, a in present]):
                    u, s, vh = _mix_run(layer, group, start, stop, lname, present)
                    delta[group, start:stop] = s
                    runs.append((group, start, stop, u.to(layer.U.dtype), vh.to(layer.Vh.dtype)))
            mixed.deltas[lname] = delta.to(layer.S.dtype)
            mixed.bases[lname] = runs
        parameters = dict(model.named_parameters())
        for pname in {p for _, a in chosen for p in a.extra}:
            base = parameters[pname].detach()
            change = sum(w * (a.extra[pname].to(base.device) - base) for w, a in chosen if pname in a.extra)
            mixed.extra[pname] = (base + change).to(base.dtype)
    adapters.adapters[name] = mixed
    _activate(model, adapters, name)


def _merged_runs(group: int, bases: list[list[Run]]) -> list[tuple[int, int]]:
    """Union of the tied runs of ``group`` over all adapters, overlapping runs merged."""
    spans = sorted((a, b) for runs in bases for g, a, b, _, _ in runs if g == group)
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _mix_run(layer: nn.Module, group: int, start: int, stop: int, lname: str, present: list) -> tuple:
    """Singular vectors and values of the mixed change restricted to one run, in float64 (float32 on MPS)."""
    exact = exact_dtype(layer.U.device)
    base_u = layer.U.detach()[group, :, start:stop].to(exact)
    base_vh = layer.Vh.detach()[group, start:stop, :].to(exact)
    core = torch.zeros(stop - start, stop - start, dtype=exact, device=base_u.device)
    for weight, adapter in present:
        u, vh = base_u.clone(), base_vh.clone()
        for g, a, b, run_u, run_vh in adapter.bases.get(lname, []):
            if g == group and start <= a and b <= stop:
                u[:, a - start : b - start] = run_u.to(base_u.device, exact)
                vh[a - start : b - start, :] = run_vh.to(base_u.device, exact)
        values = adapter.deltas[lname][group, start:stop].to(base_u.device, exact)
        core += weight * (base_u.T @ (u * values)) @ (vh @ base_vh.T)
    if is_null_group(layer.S0.detach()[group], start, stop):
        p, s, qh = torch.linalg.svd(core)  # zero singular values: left and right vectors pair freely
        return base_u @ p, s, qh @ base_vh
    # A non-zero tied run: every adapter's basis is the base's rotated by the same R on both sides, so the core is
    # symmetric, and rotating both sides by its eigenvectors keeps U diag(S0) Vh = W (the three-op form needs it).
    values, vectors = torch.linalg.eigh((core + core.T) / 2)
    return base_u @ vectors, values, vectors.T @ base_vh


def _sync(model: nn.Module, adapters: AdapterSet) -> None:
    """Copy the layers' current values (possibly trained further) back into the active adapter."""
    if adapters.active is None:
        return
    adapter = adapters.adapters[adapters.active]
    with torch.no_grad():
        for lname, layer in svf_layers(model):
            delta = change(layer.S.detach(), layer.S0)
            if lname in adapter.deltas or bool(delta.any()):
                adapter.deltas[lname] = delta.clone()
            if layer.residual is not None:  # U or V train: their values belong to the adapter too
                adapter.factors[lname] = (layer.U.detach().clone(), layer.Vh.detach().clone())
        parameters = dict(model.named_parameters())
        for pname in adapter.extra:
            adapter.extra[pname] = parameters[pname].detach().clone()


def _activate(model: nn.Module, adapters: AdapterSet, name: str | None) -> None:
    """Write adapter ``name``'s values (``None``: the plain base) into the layers."""
    adapter = adapters.adapters[name] if name is not None else None
    with torch.no_grad():
        for lname, layer in svf_layers(model):
            for (key_name, g, a, b), (u, vh) in adapters.base_columns.items():
                if key_name == lname:
                    layer.U[g, :, a:b] = u.to(layer.U.device)
                    layer.Vh[g, a:b, :] = vh.to(layer.Vh.device)
            if lname in adapters.base_factors:
                layer.U.copy_(adapters.base_factors[lname][0])
                layer.Vh.copy_(adapters.base_factors[lname][1])
            delta = None
            if adapter is not None:
                if lname in adapter.factors:
                    adapters.base_factors.setdefault(lname, (layer.U.detach().clone(), layer.Vh.detach().clone()))
                    layer.U.copy_(adapter.factors[lname][0])  # copy_ also moves across devices
                    layer.Vh.copy_(adapter.factors[lname][1])
                for g, a, b, u, vh in adapter.bases.get(lname, []):
                    key = (lname, g, a, b)
                    if key not in adapters.base_columns:
                        adapters.base_columns[key] = (layer.U[g, :, a:b].clone(), layer.Vh[g, a:b, :].clone())
                    layer.U[g, :, a:b] = u.to(layer.U.device)
                    layer.Vh[g, a:b, :] = vh.to(layer.Vh.device)
                delta = adapter.deltas.get(lname)
            layer.S.copy_(layer.S0 if delta is None else restore(layer.S0, delta, layer.S.dtype))
        parameters = dict(model.named_parameters())
        for pname in set(adapters.base_extra) | set(adapter.extra if adapter else ()):
            parameter = parameters[pname]
            if pname not in adapters.base_extra:
                adapters.base_extra[pname] = parameter.detach().clone()
            value = (
                adapter.extra[pname] if adapter is not None and pname in adapter.extra else adapters.base_extra[pname]
            )
            parameter.copy_(value)
    adapters.active = name
