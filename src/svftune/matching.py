"""Which layers of a model ``svftune.apply_svf`` adapts, and every error about that choice.

``layers`` (and ``exclude``) may be:

- a list of module-name prefixes: ``["layer2", "layer3"]`` selects ``layer2`` and everything inside it
  (``layer2.0.conv1``...), but not ``layer20``. Every prefix must match something, so a typo is an error.
- one string: a regular expression matched from the start of the module name up to a name boundary, so
  ``"layer[2-4]"`` selects everything inside layer2, layer3 and layer4 and ``r"layer4\\.2\\.conv2"`` one layer.
- a callable ``(name, module) -> bool``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

from torch import nn

from .layers import LAYER_KINDS, SVFLayer, plain_classes, unsupported_reason

LayerSelector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


def _compile(spec: LayerSelector, argument: str) -> tuple[Callable[[str, nn.Module], bool], list[str]]:
    """A predicate for ``spec`` and the literal prefixes that must each match something."""
    if callable(spec):
        return spec, []
    if isinstance(spec, str):
        try:
            pattern = re.compile(rf"(?:{spec})(?:\.|$)")
        except re.error as err:
            raise ValueError(f"{argument}={spec!r} is not a valid regular expression: {err}") from None
        return (lambda name, module: pattern.match(name) is not None), []
    if isinstance(spec, Sequence) and spec and all(isinstance(p, str) and p for p in spec):
        prefixes = list(spec)
        return (lambda name, module: any(name == p or name.startswith(p + ".") for p in prefixes)), prefixes
    raise TypeError(
        f"{argument}={spec!r} is not valid: give a list of module-name prefixes such as ['layer2', 'layer3'], "
        "a regular expression string, or a callable (name, module) -> bool"
    )


def _check_targets(targets: Sequence[type[nn.Module]] | None) -> tuple[type[nn.Module], ...]:
    supported = plain_classes()
    if targets is None:
        return supported
    targets = tuple(targets) if isinstance(targets, Sequence) else (targets,)
    for target in targets:
        if not (isinstance(target, type) and issubclass(target, supported)):
            raise TypeError(
                f"targets may only hold the supported layer types ({', '.join(LAYER_KINDS)}) or their subclasses, "
                f"got {target!r}"
            )
    if not targets:
        raise ValueError(f"targets is empty: leave it as None for every supported type ({', '.join(LAYER_KINDS)})")
    return targets


def describe_model(model: nn.Module, limit: int = 25) -> str:
    """Describe the top-level children of ``model`` with their Conv/Linear counts, for error messages.

    Args:
        model: the model to describe.
        limit: how many children to list before summarising the rest as "... and N more".

    Returns:
        A multi-line text: one line per child (name, class, counts of Conv/Linear/SVF layers inside it) and the
        model's total counts.
    """
    lines = []
    for name, child in list(model.named_children())[:limit]:
        kinds = Counter(type(m).__name__ for m in child.modules() if isinstance(m, (*plain_classes(), SVFLayer)))
        counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        lines.append(f"  {name} ({type(child).__name__}{': ' + counts if counts else ''})")
    extra = len(list(model.children())) - limit
    if extra > 0:
        lines.append(f"  ... and {extra} more")
    totals = Counter(type(m).__name__ for m in model.modules() if isinstance(m, plain_classes()))
    total = ", ".join(f"{n} {k}" for k, n in sorted(totals.items())) or "no Conv or Linear layers"
    return "Top-level children of the model:\n" + "\n".join(lines) + f"\nIn total: {total}."


def select_layers(
    model: nn.Module,
    layers: LayerSelector = None,
    targets: Sequence[type[nn.Module]] | None = None,
    exclude: LayerSelector = None,
) -> list[tuple[str, nn.Module]]:
    """Resolve which layers ``apply_svf`` adapts, with a clear error for every bad choice.

    ``apply_svf(model, layers, targets=..., exclude=...)`` adapts exactly these layers, so this is the way to
    preview a selection. Only the layers of ``targets`` inside the selection are returned (a selected block
    contributes its Conv/Linear layers; its norm layers and activations are skipped).

    Args:
        model: the model to select from.
        layers: which layers to adapt: a list of module-name prefixes (``["layer2", "layer3"]`` selects
            ``layer2`` and everything inside it, but not ``layer20``; every prefix must match a module), a
            regular expression matched from the start of the name up to a name boundary (``"layer[2-4]"``),
            or a callable ``(name, module) -> bool``. ``None`` selects every target layer.
        targets: the layer types to adapt: subclasses of ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` /
            ``nn.Conv3d`` (default: those four).
        exclude: layers to leave out, in the same forms as ``layers``.

    Returns:
        The ``(name, module)`` pairs to adapt, in ``model.named_modules()`` order.

    Raises:
        ValueError: a prefix matches no module (the message lists the model's top-level children), nothing is
            selected, a selected layer already is an SVF layer, ``targets`` is empty, or a regular expression
            does not compile.
        TypeError: ``layers``/``exclude``/``targets`` has the wrong type, or a selected layer cannot be
            adapted (transposed conv, parametrized, hooked, overriding ``forward``...); the message lists
            every such layer with the reason.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> import svftune
        >>> model = nn.Sequential(OrderedDict(
        ...     stem=nn.Conv2d(3, 8, 3),
        ...     body=nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)),
        ...     head=nn.Linear(8, 2),
        ... ))
        >>> [name for name, _ in svftune.select_layers(model, ["body"])]
        ['body.0', 'body.2']
        >>> [name for name, _ in svftune.select_layers(model, "stem|head")]
        ['stem', 'head']
        >>> [name for name, _ in svftune.select_layers(model, exclude=["body.2"], targets=[nn.Conv2d])]
        ['stem', 'body.0']
        >>> [name for name, _ in svftune.select_layers(model, lambda name, m: isinstance(m, nn.Linear))]
        ['head']
        >>> svftune.select_layers(model, ["bdy"])
        Traceback (most recent call last):
            ...
        ValueError: layers entry 'bdy' matches no module of the model.
        Top-level children of the model:
          stem (Conv2d: 1 Conv2d)
          body (Sequential: 2 Conv2d)
          head (Linear: 1 Linear)
        In total: 3 Conv2d, 1 Linear.
    """
    targets = _check_targets(targets)
    include, prefixes = (lambda n, m: True, []) if layers is None else _compile(layers, "layers")
    skip, skip_prefixes = (lambda n, m: False, []) if exclude is None else _compile(exclude, "exclude")
    names = [name for name, _ in model.named_modules()]
    for argument, literal in (("layers", prefixes), ("exclude", skip_prefixes)):
        for prefix in literal:
            if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                raise ValueError(
                    f"{argument} entry {prefix!r} matches no module of the model.\n{describe_model(model)}"
                )

    # A transposed conv is no Conv2d, but it is the kind of layer a user asking for convs means: refuse it
    # loudly instead of skipping it silently.
    convs_targeted = any(issubclass(t, nn.modules.conv._ConvNd) for t in targets)
    selected, already, refused = [], [], []
    for name, module in model.named_modules():
        if not name or not include(name, module) or skip(name, module):
            continue
        if isinstance(module, SVFLayer):
            already.append(name)
        elif isinstance(module, targets) or (convs_targeted and isinstance(module, nn.modules.conv._ConvNd)):
            reason = unsupported_reason(module)
            if reason is not None:
                refused.append(f"  {name}: {reason}")
            else:
                selected.append((name, module))
    if already:
        shown = ", ".join(already[:5]) + (f" and {len(already) - 5} more" if len(already) > 5 else "")
        raise ValueError(
            f"SVF is already applied to {shown}. Applying it twice would decompose the SVF factors again; "
            "call svftune.unapply_svf(model) (or merge_svf) first, or pick other layers."
        )
    if refused:
        raise TypeError("apply_svf selected layers it cannot adapt:\n" + "\n".join(refused))
    if not selected:
        if isinstance(model, (*plain_classes(), SVFLayer)) and not list(model.children()):
            raise ValueError(
                f"apply_svf adapts the layers inside a model, but got a bare {type(model).__name__}; "
                "wrap a single layer with svftune.SVFConv2d(layer) / SVFLinear(layer) instead"
            )
        chosen = f"layers={layers!r}" if layers is not None else "the default (every layer)"
        restrict = f", targets={[t.__name__ for t in targets]}" + (f", exclude={exclude!r}" if exclude else "")
        raise ValueError(f"apply_svf matched no layer with {chosen}{restrict}.\n{describe_model(model)}")
    return selected
