"""Shared (tied) weights: found before anything is adapted, refused by default, or kept tied on request.

A weight ``Parameter`` held by more than one module (a language model's ``lm_head`` tied to its input embedding,
one block reused at several places, two projections assigned the same ``Parameter``) cannot be replaced at one
place only: the other holders would keep the old weight and the tie would silently break. ``apply_svf`` therefore
checks every selected weight:

- ``tied="error"`` (the default): a ``ValueError`` naming both places and the two ways out;
- ``tied="keep"``: the shared weight is adapted once. A module reused at several places gets the same SVF layer at
  every place; any other module holding the weight (e.g. the embedding) reads the SVF layer's effective weight: its
  ``weight`` stops being a registered ``Parameter`` (the SVF layer holds it as ``base_weight``) and a forward
  pre-hook sets it to the SVF layer's ``weight`` before each forward, so gradients reach ``S`` from both places.
  ``merge_svf`` gives every holder the same merged ``Parameter`` (tied again) and ``unapply_svf`` the original.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import SVFLayer

TIED_MODES = ("error", "keep")
"""Values of ``apply_svf(tied=...)``."""
_HOLDERS = "_svf_tie_holders"  # on an SVF layer's __dict__: [(module, attribute)] reading its effective weight


class TieHook:
    """A forward pre-hook that gives a module's ``attr`` the effective weight of an SVF layer (``tied="keep"``)."""

    def __init__(self, layer: SVFLayer, attr: str) -> None:
        """Read ``layer.weight`` into ``module.<attr>`` before each forward."""
        self.layer, self.attr = layer, attr

    def __call__(self, module: nn.Module, args: tuple) -> None:
        """Set the attribute (differentiable in the trained factors when gradients are on)."""
        module.__dict__[self.attr] = self.layer.weight


def normalize_tied(tied: str) -> str:
    """Validate ``apply_svf(tied=...)``; raises ValueError otherwise."""
    if tied not in TIED_MODES:
        raise ValueError(f"tied={tied!r} is not valid: choose 'error' (the default) or 'keep'")
    return tied


def shared_places(model: nn.Module, selected: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """For every selected layer whose weight another place of the model also holds, those places.

    Args:
        model: the model.
        selected: the ``(name, module)`` pairs about to be adapted.

    Returns:
        ``{layer name: [other parameter names holding its weight]}`` (only layers with shared weights).
    """
    holders: dict[int, list[str]] = {}
    for pname, parameter in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(parameter), []).append(pname)
    shared = {}
    for name, module in selected:
        others = [p for p in holders.get(id(module.weight), []) if p != f"{name}.weight"]
        if others:
            shared[name] = others
    return shared


def refuse(shared: dict[str, list[str]]) -> None:
    """Raise the ``tied="error"`` error for ``shared`` (from ``shared_places``), if it is not empty."""
    if not shared:
        return
    lines = [f"  {name}.weight is also {', '.join(others)}" for name, others in shared.items()]
    names = list(shared)
    raise ValueError(
        "apply_svf selected weights that other places of the model share (tied weights):\n"
        + "\n".join(lines)
        + "\nAdapting them at one place would silently untie them. Either leave them out "
        f"(exclude={names!r}), or pass tied='keep' to adapt each shared weight once and keep every holder on the "
        "adapted weight (through training, save/load and merge_svf)."
    )


def layer_places(model: nn.Module) -> dict[int, tuple[SVFLayer, list[str]]]:
    """Every SVF layer of ``model`` once (by ``id``), with every module path it sits at (several with ``keep``)."""
    places: dict[int, tuple[SVFLayer, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, SVFLayer):
            places.setdefault(id(module), (module, []))[1].append(name)
    return places


def _paths(model: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def plan_keep(model: nn.Module, selected: list[tuple[str, nn.Module]]) -> tuple[list, dict[int, list[str]]]:
    """Split a ``tied="keep"`` selection: the layers to adapt once, and where each one also lives.

    Args:
        model: the model.
        selected: the ``(name, module)`` pairs selected for adaptation.

    Returns:
        ``(adapt, places)``: ``adapt`` the ``(name, module)`` pairs to build SVF layers for (a weight shared by two
        selected modules is adapted at the first one), and ``places`` by ``id(module)`` every module path where the
        adapted module also sits.
    """
    paths = _paths(model)
    adapt, seen = [], set()
    for name, module in selected:
        if id(module.weight) not in seen:
            seen.add(id(module.weight))
            adapt.append((name, module))
    return adapt, {id(m): paths[id(m)] for _, m in adapt}


def tie_holders(model: nn.Module, weight: Tensor, layer: SVFLayer, owner: nn.Module) -> list[str]:
    """Make every module other than ``owner`` that holds ``weight`` read ``layer``'s effective weight.

    Args:
        model: the model.
        weight: the shared base weight ``Parameter``.
        layer: the SVF layer built from ``owner``.
        owner: the plain layer ``layer`` replaces (it may sit at several places; those get ``layer`` itself).

    Returns:
        The parameter names now tied to ``layer``.
    """
    tied, holders = [], []
    for mname, module in list(model.named_modules(remove_duplicate=False)):  # collected first: this adds modules
        if module is owner or isinstance(module, SVFLayer):
            continue
        for attr, parameter in module._parameters.items():
            if parameter is weight and (module, attr) not in holders:
                holders.append((module, attr))
                tied.append(f"{mname}.{attr}" if mname else attr)
    for module, attr in holders:
        del module._parameters[attr]  # the SVF layer holds this Parameter as its base_weight
        module.__dict__[attr] = weight
        module.register_forward_pre_hook(TieHook(layer, attr))
    if holders:
        layer.__dict__[_HOLDERS] = holders
    return tied


def holders_of(layer: SVFLayer) -> list[tuple[nn.Module, str]]:
    """The ``(module, attribute)`` places tied to ``layer`` with ``tied="keep"`` (empty otherwise)."""
    return list(layer.__dict__.get(_HOLDERS, ()))


def release(layer: SVFLayer, plain: nn.Module) -> None:
    """Remove ``layer``'s tie hooks; every holder gets ``plain``'s weight ``Parameter`` back (tied again)."""
    for module, attr in holders_of(layer):
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, TieHook) and hook.layer is layer:
                del module._forward_pre_hooks[key]
        module.__dict__.pop(attr, None)
        module.register_parameter(attr, plain.weight)
    layer.__dict__.pop(_HOLDERS, None)
