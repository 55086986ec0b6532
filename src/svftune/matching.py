"""Which layers of a model ``svftune.apply_svf`` adapts, and every error and warning about that choice.

``layers`` (and ``exclude``) may be:

- a list of names. Each entry is first read as a module path from the root of the model: ``["layer2",
  "layer3"]`` selects ``layer2`` and everything inside it (``layer2.0.conv1``...), but not ``layer20``. An entry that
  is no such path is read the way PEFT reads ``target_modules``: it selects every module whose name ends with
  ``"." + entry`` (``["q_proj", "v_proj"]`` selects ``model.layers.0.self_attn.q_proj``... at any depth). Every entry
  must select something, so a typo is an error, which suggests the names that exist. When an entry is a root path
  *and* the last name of deeper modules (``"conv1"`` in a ResNet), the root path wins and a warning says so.
- ``"all-linear"``: every Linear-like layer (``nn.Linear`` and transformers' ``Conv1D``) except the model's output
  layer (``model.get_output_embeddings()``), as PEFT's ``target_modules="all-linear"``.
- any other string: a regular expression matched from the start of the module name up to a name boundary, so
  ``"layer[2-4]"`` selects everything inside layer2, layer3 and layer4 and ``r"layer4\\.2\\.conv2"`` one layer. A
  PEFT ``target_modules`` regex (which PEFT full-matches, e.g. ``r".*\\.(q_proj|v_proj)"``) selects the same layers.
- a callable ``(name, module) -> bool``.

Layers that another adapter owns (a PEFT tuner layer such as LoRA's, with its ``base_layer``, or a PEFT
``modules_to_save`` wrapper) are never selected. Those and layers that hold a weight matrix but are of no supported
type are passed over with an ``SVFSelectionWarning`` that names them.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .layers import LAYER_KINDS, SVFLayer, layer_kind, plain_classes, unsupported_reason

LayerSelector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
ALL_LINEAR = "all-linear"
"""The ``layers`` value that selects every Linear-like layer but the output layer (PEFT's spelling)."""
_LINEAR_KINDS = ("Linear", "Conv1D")
_PEFT_OWNER_CLASSES = ("BaseTunerLayer", "AuxiliaryTrainingWrapper")
_NOT_PROJECTIONS = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class SVFSelectionWarning(UserWarning):
    """``apply_svf`` passed over layers a user may have meant: unsupported weight layers, another adapter's
    layers, or an ambiguous name; the message names them."""


def _is_peft_owned(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT tuner layer or ``modules_to_save`` wrapper (recognised without importing peft)."""
    return any(
        cls.__name__ in _PEFT_OWNER_CLASSES and cls.__module__.startswith("peft") for cls in type(module).__mro__
    )


def peft_owned_names(model: nn.Module) -> list[str]:
    """Names of the PEFT tuner layers and ``modules_to_save`` wrappers in ``model`` (outermost ones only).

    Args:
        model: any model.

    Returns:
        Module names; their parameters and submodules belong to PEFT, not to the base model.
    """
    owned: list[str] = []
    for name, module in model.named_modules():
        if name and _is_peft_owned(module) and not any(name.startswith(o + ".") for o in owned):
            owned.append(name)
    return owned


def _looks_like_projection(module: nn.Module) -> bool:
    """A module of no supported type that holds a weight matrix of its own (a custom or third-party layer)."""
    weight = module._parameters.get("weight")
    return (
        isinstance(weight, Tensor)
        and weight.dim() >= 2
        and layer_kind(module) is None
        and not isinstance(module, (SVFLayer, nn.modules.conv._ConvTransposeNd, *_NOT_PROJECTIONS))
    )


def _path_match(name: str, entry: str) -> bool:
    return name == entry or name.startswith(entry + ".")


def _suffix_match(name: str, entry: str) -> bool:
    """PEFT's target_modules rule, extended to the modules inside: ``...entry`` or ``...entry.<inside>``."""
    return name.endswith("." + entry) or ("." + entry + ".") in name


def _names_rule(entries: list[str], names: list[str], argument: str) -> Callable[[str, nn.Module], bool]:
    """The predicate of a list of names: root paths, else PEFT-style suffixes (see the module documentation)."""
    as_path = {e for e in entries if any(_path_match(n, e) for n in names)}
    for entry in as_path:
        deeper = [n for n in names if n.endswith("." + entry)]
        if deeper:
            warnings.warn(
                f"{argument} entry {entry!r} is a module path from the root of the model, so it selects that module "
                f"only; {len(deeper)} deeper modules also end with '.{entry}' ({deeper[0]}...). To select those too "
                rf"(PEFT's target_modules rule), write {argument}=r'(.*\.)?{re.escape(entry)}'.",
                SVFSelectionWarning,
                stacklevel=4,
            )
    paths = [e for e in entries if e in as_path]
    suffixes = [e for e in entries if e not in as_path]
    return lambda name, module: (
        any(_path_match(name, e) for e in paths) or any(_suffix_match(name, e) for e in suffixes)
    )


def _compile(spec: LayerSelector, argument: str, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """A predicate for ``spec``; raises for a malformed one or a list entry that selects nothing."""
    if callable(spec):
        return spec
    if spec == ALL_LINEAR:
        output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        linear = tuple(cls for k in _LINEAR_KINDS if (cls := LAYER_KINDS[k].plain_class()) is not None)
        return lambda name, module: isinstance(module, linear) and module is not output
    if isinstance(spec, str):
        try:
            pattern = re.compile(rf"(?:{spec})(?:\.|$)")
        except re.error as err:
            raise ValueError(f"{argument}={spec!r} is not a valid regular expression: {err}") from None
        return lambda name, module: pattern.match(name) is not None
    if isinstance(spec, Sequence) and spec and all(isinstance(p, str) and p for p in spec):
        names = [name for name, _ in model.named_modules()]
        for entry in spec:
            if not any(_path_match(n, entry) or _suffix_match(n, entry) for n in names):
                raise ValueError(
                    f"{argument} entry {entry!r} matches no module of the model{_suggest(entry, names)}.\n"
                    f"{describe_model(model)}"
                )
        return _names_rule(list(spec), names, argument)
    raise TypeError(
        f"{argument}={spec!r} is not valid: give a list of module-name prefixes such as ['layer2', 'layer3'] or "
        "PEFT-style names such as ['q_proj', 'v_proj'], 'all-linear', a regular expression string, or a callable "
        "(name, module) -> bool"
    )


def _suggest(entry: str, names: list[str]) -> str:
    """``" (did you mean ...?)"`` from the model's module paths and last names, or ``""``."""
    last = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    close = difflib.get_close_matches(entry, last, n=3, cutoff=0.6)
    close += [n for n in difflib.get_close_matches(entry, names, n=2, cutoff=0.75) if n not in close]
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


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


def _counts(modules) -> str:
    supported = Counter(type(m).__name__ for m in modules if isinstance(m, (*plain_classes(), SVFLayer)))
    other = Counter(type(m).__name__ for m in modules if _looks_like_projection(m))
    text = [f"{n} {k}" for k, n in sorted(supported.items())]
    text += [f"{n} {k} (not supported)" for k, n in sorted(other.items())]
    return ", ".join(text)


def describe_model(model: nn.Module, limit: int = 25) -> str:
    """Describe the top-level children of ``model`` with their layer counts, for error messages.

    Args:
        model: the model to describe.
        limit: how many children to list before summarising the rest as "... and N more".

    Returns:
        A multi-line text: one line per child (name, class, counts of supported and SVF layers inside it, and of
        layers holding a weight matrix of an unsupported type) and the model's total counts.
    """
    lines = []
    for name, child in list(model.named_children())[:limit]:
        counts = _counts(list(child.modules()))
        lines.append(f"  {name} ({type(child).__name__}{': ' + counts if counts else ''})")
    extra = len(list(model.children())) - limit
    if extra > 0:
        lines.append(f"  ... and {extra} more")
    total = _counts([m for m in model.modules() if not isinstance(m, SVFLayer)]) or "no Conv or Linear layers"
    return "Top-level children of the model:\n" + "\n".join(lines) + f"\nIn total: {total}."


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


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
        layers: which layers to adapt: a list of names (module paths from the root, ``["layer2", "layer3"]``
            selects ``layer2`` and everything inside it but not ``layer20``; an entry that is no such path selects,
            as PEFT's ``target_modules`` does, every module whose name ends with ``"." + entry``, e.g.
            ``["q_proj", "v_proj"]``), ``"all-linear"`` (every Linear-like layer but the output layer), a regular
            expression matched from the start of the name up to a name boundary (``"layer[2-4]"``), or a callable
            ``(name, module) -> bool``. ``None`` selects every target layer.
        targets: the layer types to adapt: subclasses of the supported types (``svftune.layers.LAYER_KINDS``:
            ``nn.Linear``, ``nn.Conv1d``/``Conv2d``/``Conv3d``, transformers' ``Conv1D``; default: all of them).
        exclude: layers to leave out, in the same forms as ``layers``.

    Returns:
        The ``(name, module)`` pairs to adapt, in ``model.named_modules()`` order.

    Raises:
        ValueError: a list entry matches no module (the message suggests close names and lists the model's
            top-level children), nothing is selected, a selected layer already is an SVF layer, ``targets`` is
            empty, or a regular expression does not compile.
        TypeError: ``layers``/``exclude``/``targets`` has the wrong type, or a selected layer cannot be
            adapted (transposed conv, parametrized, hooked, overriding ``forward``...); the message lists
            every such layer with the reason.

    Warns:
        SVFSelectionWarning: the selection passed over layers that hold a weight matrix but are of no supported
            type, or over layers owned by a PEFT adapter; or a list entry is both a root path and a deeper name.

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
        >>> [name for name, _ in svftune.select_layers(model, ["0", "2"])]  # not root paths: PEFT-style names
        ['body.0', 'body.2']
        >>> svftune.select_layers(model, ["bdy"])
        Traceback (most recent call last):
            ...
        ValueError: layers entry 'bdy' matches no module of the model (did you mean 'body'?).
        Top-level children of the model:
          stem (Conv2d: 1 Conv2d)
          body (Sequential: 2 Conv2d)
          head (Linear: 1 Linear)
        In total: 3 Conv2d, 1 Linear.
    """
    targets = _check_targets(targets)
    include = (lambda n, m: True) if layers is None else _compile(layers, "layers", model)
    skip = (lambda n, m: False) if exclude is None else _compile(exclude, "exclude", model)
    owned = peft_owned_names(model)

    # A transposed conv is no Conv2d, but it is the kind of layer a user asking for convs means: refuse it
    # loudly instead of skipping it silently.
    convs_targeted = any(issubclass(t, nn.modules.conv._ConvNd) for t in targets)
    selected, already, refused, passed, peft = [], [], [], [], []
    for name, module in model.named_modules():
        if not name or not include(name, module) or skip(name, module):
            continue
        owner = next((o for o in owned if _path_match(name, o)), None)
        if owner is not None:
            if isinstance(module, (*targets, SVFLayer)) and owner not in peft:
                peft.append(owner)
        elif isinstance(module, SVFLayer):
            already.append(name)
        elif isinstance(module, targets) or (convs_targeted and isinstance(module, nn.modules.conv._ConvNd)):
            reason = unsupported_reason(module)
            if reason is not None:
                refused.append(f"  {name}: {reason}")
            else:
                selected.append((name, module))
        elif _looks_like_projection(module):
            passed.append(f"{name} ({type(module).__name__})")
    if already:
        raise ValueError(
            f"SVF is already applied to {_shown(already)}. Applying it twice would decompose the SVF factors again; "
            "call svftune.unapply_svf(model) (or merge_svf) first, or pick other layers."
        )
    if refused:
        raise TypeError("apply_svf selected layers it cannot adapt:\n" + "\n".join(refused))
    notes = []
    if passed:
        notes.append(
            f"passed over {len(passed)} layers that hold a weight matrix but are of no supported type "
            f"({', '.join(LAYER_KINDS)}): {_shown(passed)}"
        )
    if peft:
        notes.append(f"left out {len(peft)} layers that a PEFT adapter owns (its tuner layers): {_shown(peft)}")
    if not selected:
        if isinstance(model, (*plain_classes(), SVFLayer)) and not list(model.children()):
            raise ValueError(
                f"apply_svf adapts the layers inside a model, but got a bare {type(model).__name__}; "
                "wrap a single layer with svftune.SVFConv2d(layer) / SVFLinear(layer) instead"
            )
        chosen = f"layers={layers!r}" if layers is not None else "the default (every layer)"
        restrict = f", targets={[t.__name__ for t in targets]}" + (f", exclude={exclude!r}" if exclude else "")
        hint = _regex_hint(layers, model)
        notes_text = "".join(f"\nIt {note}." for note in notes)
        raise ValueError(
            f"apply_svf matched no layer with {chosen}{restrict}.{hint}{notes_text}\n{describe_model(model)}"
        )
    for note in notes:
        warnings.warn(f"apply_svf {note}.", SVFSelectionWarning, stacklevel=3)
    return selected


def _regex_hint(layers: LayerSelector, model: nn.Module) -> str:
    """For a regex string that is a bare name found deeper in the model: the spellings that select it."""
    if not isinstance(layers, str) or not re.fullmatch(r"[\w.]+", layers) or layers == ALL_LINEAR:
        return ""
    deeper = [n for n, _ in model.named_modules() if n.endswith("." + layers)]
    if not deeper:
        return ""
    return (
        f"\nA string is a regular expression matched from the start of the module name; {len(deeper)} modules end "
        f"with '.{layers}' ({deeper[0]}...): select them with layers=[{layers!r}] (PEFT's target_modules list "
        rf"rule) or layers=r'.*\.{re.escape(layers)}'."
    )


def selected_modules(model: nn.Module, names: Sequence[str], argument: str) -> list[str]:
    """The outermost modules a list of names selects (the list rule of ``layers``), e.g. for ``modules_to_save``.

    Args:
        model: the model.
        names: module paths or PEFT-style names, as a ``layers`` list.
        argument: the argument's name, for error messages.

    Returns:
        Module names in model order, none inside another.

    Raises:
        ValueError: an entry matches no module (the message suggests close names).
        TypeError: ``names`` is not a non-empty list of strings.
    """
    if isinstance(names, str) or not (isinstance(names, Sequence) and names and all(isinstance(n, str) for n in names)):
        raise TypeError(f"{argument}={names!r} is not valid: give a list of module names such as ['classifier']")
    rule = _compile(list(names), argument, model)
    chosen: list[str] = []
    for name, module in model.named_modules():
        if name and rule(name, module) and not any(_path_match(name, c) for c in chosen):
            chosen.append(name)
    return chosen
