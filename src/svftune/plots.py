"""Pictures of what SVF changed: singular-value changes (the paper's Figure 6) and subspace activation maps
(Figures 4-5); examples in docs/pictures.md.

Computation and drawing are separate. ``singular_value_changes`` and ``subspace_activations`` return plain
tensors (float64) that can be checked exactly; ``plot_singular_value_changes`` and ``plot_subspace_activations``
turn them into a ``matplotlib.figure.Figure``. Matplotlib is optional (``pip install 'svftune[plots]'``), imported
only inside the drawing functions, which use the object API (no ``pyplot`` state), so any backend works headless.

**Directions.** A layer folded per group to ``W_g = U_g diag(S_g) Vh_g`` is a sum of rank-one components
``S[g, r] * u_{g,r} v_{g,r}^T``, one per singular value; ``(g, r)`` names one of them (``g`` is always 0 for
ungrouped layers and Linear layers).

**Activation map of a direction.** For an input ``x`` of the layer and an output position ``p`` with input patch
``x_p`` (the ``in/groups * prod(kernel)`` values the layer's kernel sees there, in group ``g``, with the layer's
own stride, padding, dilation and padding mode), the map is ``A[g, r](p) = |S[g, r]| * |v_{g,r}^T x_p|``,
the Euclidean norm of what the rank-one component adds to the layer's output at ``p`` (``||u_{g,r}|| = 1``):
the absolute value of channel ``g * R + r`` of the ``Vh``-conv of the paper's three-op form, scaled by the
fine-tuned singular value. The absolute value makes the map independent of the SVD's arbitrary sign choice
(``(u, v)`` and ``(-u, -v)`` are both valid); ``signed=True`` returns ``S[g, r] * v_{g,r}^T x_p`` instead, whose
sign follows that choice. Inside a run of tied singular values the single directions are not unique either (any
rotation is a valid SVD): only pictures of untied directions mean something.

**Which directions.** By default the ``top`` directions whose singular value grew most and the ``top`` that
shrank most, ranked by ``by="absolute"`` (``S - S0``) or ``by="relative"`` (``(S - S0) / S0``); values that did
not change are never chosen. Ties in the ranking go to the lower ``(g, r)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import SVFCheckpoint, read_svf
from .constants import exact_dtype
from .layers import SVFLayer
from .model import svf_layers

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

RANKINGS = ("absolute", "relative")
__all__ = [
    "RANKINGS",
    "Direction",
    "LayerChanges",
    "PlotError",
    "SubspaceActivations",
    "capture_input",
    "plot_singular_value_changes",
    "plot_subspace_activations",
    "singular_value_changes",
    "subspace_activations",
    "to_png",
]


class PlotError(ValueError):
    """The input of a plotting function does not fit (unknown layer, not an SVF layer, nothing changed, ...)."""


# ------------------------------------------------------------------------------------------------ changes
@dataclass
class LayerChanges:
    """Singular-value changes of one layer, sorted by ``key`` from the largest increase to the largest decrease.

    All tensors are 1-D, one entry per listed singular value, float64 (``group``/``index``: int64).
    ``s0``, ``s`` and ``relative`` are ``None`` when only the changes are known (a checkpoint without its base).

    Attributes:
        name: the layer's name in the model / checkpoint.
        groups: groups of the layer's weight.
        rank: singular values per group.
        by: the ranking used for ``key`` (``"absolute"`` or ``"relative"``).
        group: the group ``g`` of each entry.
        index: the index ``r`` inside its group (0 = the largest pretrained singular value).
        delta: ``S - S0``.
        s0: pretrained singular values ``S0``.
        s: fine-tuned singular values ``S``.
        relative: ``(S - S0) / S0`` (0 where ``S0 == 0`` and nothing changed, +-inf where ``S0 == 0`` changed).
        key: the value the entries are sorted by (``delta`` or ``relative``).
        total: singular values in the layer (the listing may hold fewer, see ``top``).
    """

    name: str
    groups: int
    rank: int
    by: str
    group: Tensor
    index: Tensor
    delta: Tensor
    s0: Tensor | None
    s: Tensor | None
    relative: Tensor | None
    key: Tensor
    total: int

    def __len__(self) -> int:
        return int(self.delta.numel())

    def label(self, i: int) -> str:
        """``"r"`` (one group), ``"g"`` (one value per group, e.g. depthwise convs) or ``"g:r"`` for entry ``i``."""
        r = int(self.index[i])
        if self.groups == 1:
            return str(r)
        return str(int(self.group[i])) if self.rank == 1 else f"{int(self.group[i])}:{r}"


def _rank_key(delta: Tensor, s0: Tensor | None, by: str) -> tuple[Tensor | None, Tensor]:
    if by not in RANKINGS:
        raise PlotError(f"by={by!r} is not valid: choose 'absolute' (S - S0) or 'relative' ((S - S0) / S0)")
    if s0 is None:
        if by == "relative":
            raise PlotError(
                "by='relative' needs the pretrained singular values S0, which a checkpoint alone does not hold: "
                "pass a model with the checkpoint loaded (svftune.load_svf) or use by='absolute'"
            )
        return None, delta
    relative = delta / s0
    relative = torch.where(delta == 0, torch.zeros_like(relative), relative)  # 0/0 -> 0; x/0 -> +-inf
    return relative, relative if by == "relative" else delta


def _layer_changes(name: str, delta: Tensor, s0: Tensor | None, by: str, top: int | None) -> LayerChanges:
    groups, rank = delta.shape
    delta = delta.detach().to("cpu", torch.float64).reshape(-1)
    s0 = None if s0 is None else s0.detach().to("cpu", torch.float64).reshape(-1)
    relative, key = _rank_key(delta, s0, by)
    order = torch.sort(key, descending=True, stable=True).indices
    if top is not None:
        if top < 1:
            raise PlotError(f"top must be at least 1, got {top}")
        if 2 * top < order.numel():
            order = torch.cat([order[:top], order[-top:]])
    flat = torch.arange(groups * rank)[order]
    pick = lambda t: None if t is None else t[order]  # noqa: E731
    return LayerChanges(
        name=name,
        groups=groups,
        rank=rank,
        by=by,
        group=flat // rank,
        index=flat % rank,
        delta=delta[order],
        s0=pick(s0),
        s=None if s0 is None else pick(s0 + delta),
        relative=pick(relative),
        key=key[order],
        total=groups * rank,
    )


def _select(names: Sequence[str], layer: str | Iterable[str] | None, where: str) -> list[str]:
    if layer is None:
        return list(names)
    wanted = [layer] if isinstance(layer, str) else list(layer)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise PlotError(f"no SVF layer {', '.join(map(repr, unknown))} in {where}; {_listing(names)}")
    return wanted


def _listing(names: Sequence[str]) -> str:
    if not names:
        return "it has no SVF layer at all"
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return f"its SVF layers are: {shown}"


def singular_value_changes(
    source: nn.Module | SVFCheckpoint | str | os.PathLike,
    layer: str | Iterable[str] | None = None,
    *,
    top: int | None = None,
    by: str = "absolute",
) -> dict[str, LayerChanges]:
    """The change of every singular value, per layer, sorted from the largest increase to the largest decrease.

    Args:
        source: a model with SVF layers (``S0`` and ``S`` are known), or a checkpoint (``SVFCheckpoint``,
            or anything ``svftune.read_svf`` reads), which holds only ``S - S0``.
        layer: one layer name, several, or ``None`` for every SVF layer (model order).
        top: keep only the ``top`` largest increases and the ``top`` largest decreases of each layer
            (all values when ``2 * top`` reaches the layer's count); ``None`` keeps everything.
        by: ``"absolute"`` ranks by ``S - S0``, ``"relative"`` by ``(S - S0) / S0`` (needs a model).

    Returns:
        layer name -> ``LayerChanges`` (float64).

    Raises:
        PlotError: unknown layer (the message lists the SVF layers), bad ``top``/``by``.
    """
    if isinstance(source, nn.Module):
        layers = dict(svf_layers(source))
        names = _select(list(layers), layer, "the model")
        result = {}
        for name in names:
            module = layers[name]
            with torch.no_grad():
                delta = module.S.detach().double() - module.S0.detach().double()
            result[name] = _layer_changes(name, delta, module.S0, by, top)
        return result
    checkpoint = source if isinstance(source, SVFCheckpoint) else read_svf(source)
    names = _select(list(checkpoint.deltas), layer, f"the checkpoint {checkpoint.source}")
    return {name: _layer_changes(name, checkpoint.deltas[name], None, by, top) for name in names}


# ------------------------------------------------------------------------------------------------ activations
@dataclass
class Direction:
    """One singular direction ``(group, index)`` of a layer, with its values and why it was chosen."""

    group: int
    index: int
    s0: float
    s: float
    kind: str  # "grew", "shrank" or "chosen" (given explicitly)

    @property
    def delta(self) -> float:
        """``S - S0``."""
        return self.s - self.s0

    @property
    def relative(self) -> float:
        """``(S - S0) / S0`` (+-inf when ``S0 == 0`` and the value changed)."""
        if self.s0 == 0:
            return 0.0 if self.delta == 0 else math.copysign(math.inf, self.delta)
        return self.delta / self.s0

    def label(self, groups: int) -> str:
        """``"r=5"`` or, for grouped layers, ``"g=3 r=0"``."""
        return f"r={self.index}" if groups == 1 else f"g={self.group} r={self.index}"


@dataclass
class SubspaceActivations:
    """Activation maps of chosen singular directions of one layer for one input (see the module docstring).

    Attributes:
        layer: the layer's name.
        groups: groups of the layer.
        directions: the directions, in the order of ``maps``' direction dimension (grew first, then shrank).
        maps: float64. Conv layers: ``(N, D, *output_spatial)``; Linear layers: ``(*leading, D)``.
        signed: whether ``maps`` hold ``S * v^T x`` (True) or ``|S| * |v^T x|`` (False, the default).
        by: the ranking the directions were chosen by.
    """

    layer: str
    groups: int
    directions: list[Direction]
    maps: Tensor
    signed: bool
    by: str

    def select(self, kind: str) -> list[int]:
        """Positions (in ``directions`` / ``maps``) of the directions of one kind."""
        return [i for i, d in enumerate(self.directions) if d.kind == kind]


class _Captured(Exception):
    """Raised by the pre-hook to stop the forward pass once the layer's input is known."""


def _resolve_layer(model: nn.Module, name: str) -> SVFLayer:
    names = [n for n, _ in svf_layers(model)]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PlotError(f"the model has no layer {name!r}; {_listing(names)}") from None
    if not isinstance(module, SVFLayer):
        raise PlotError(
            f"{name!r} is a {type(module).__name__}, not an SVF layer (apply_svf or load_svf first); {_listing(names)}"
        )
    return module


def capture_input(model: nn.Module, layer: str, inputs: Any) -> Tensor:
    """The input tensor of ``layer``'s first call during a forward pass of ``model``, which is cut short there.

    Args:
        model: the model.
        layer: the name of a submodule of ``model``.
        inputs: a Tensor (``model(inputs)``), a tuple/list of positional arguments (``model(*inputs)``), or a
            callable taking no arguments that runs the forward pass itself (e.g. ``lambda: model.backbone(x)``).

    Returns:
        The captured input, detached.
    """
    module = model.get_submodule(layer)
    box: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        box.append(args[0].detach())
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            if callable(inputs) and not isinstance(inputs, Tensor):
                inputs()
            elif isinstance(inputs, (tuple, list)):
                model(*inputs)
            else:
                model(inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not box:
        raise PlotError(f"the forward pass never called {layer!r}: the inputs do not reach that layer")
    return box[0]


def _choose(layer: SVFLayer, top: int, by: str) -> list[tuple[int, int, str]]:
    delta = (layer.S.detach().double() - layer.S0.detach().double()).cpu()
    _, key = _rank_key(delta.reshape(-1), layer.S0.detach().double().cpu().reshape(-1), by)
    rank = delta.shape[1]
    values = key.tolist()
    grew = sorted((i for i, v in enumerate(values) if v > 0), key=lambda i: (-values[i], i))[:top]
    shrank = sorted((i for i, v in enumerate(values) if v < 0), key=lambda i: (values[i], i))[:top]
    return [(i // rank, i % rank, "grew") for i in grew] + [(i // rank, i % rank, "shrank") for i in shrank]


def subspace_activations(
    model: nn.Module,
    layer: str,
    inputs: Any,
    *,
    directions: Sequence[int | tuple[int, int]] | None = None,
    top: int = 3,
    by: str = "absolute",
    signed: bool = False,
) -> SubspaceActivations:
    """Activation maps of the singular directions of an SVF layer for one input (the paper's Figures 4-5).

    The layer's input is captured with a forward pre-hook (the forward pass stops there), then projected on the
    chosen rows of ``Vh`` with the layer's own stride, padding, dilation, padding mode and groups, in float64
    (float32 on devices without float64), and scaled by ``S``. See the module docstring for the definition.

    Args:
        model: a model holding the SVF layer ``layer``.
        layer: the layer's name in ``model`` (as in ``model.named_modules()``).
        inputs: what to run: a Tensor (``model(inputs)``), a tuple of positional arguments, or a callable with
            no arguments that runs the forward pass (e.g. ``lambda: model.backbone(image)``).
        directions: explicit directions, as ``(group, index)`` pairs or bare indices (group 0); by default the
            ``top`` that grew most and the ``top`` that shrank most (see ``by``).
        top: how many grown and how many shrunk directions to choose when ``directions`` is not given.
        by: ``"absolute"`` (``S - S0``) or ``"relative"`` (``(S - S0) / S0``) ranking.
        signed: return ``S * v^T x`` instead of ``|S| * |v^T x|``.

    Returns:
        ``SubspaceActivations`` with float64 maps, grown directions first.

    Raises:
        PlotError: unknown or non-SVF layer, directions out of range, no singular value changed.
    """
    module = _resolve_layer(model, layer)
    groups, rank = module.S.shape
    s0 = module.S0.detach().double().cpu()
    s = module.S.detach().double().cpu()
    if directions is None:
        if top < 1:
            raise PlotError(f"top must be at least 1, got {top}")
        chosen = _choose(module, top, by)
        if not chosen:
            raise PlotError(f"no singular value of {layer!r} changed (S == S0): there is no direction to show")
    else:
        chosen = []
        for item in directions:
            g, r = (0, item) if isinstance(item, int) else item
            if not (0 <= g < groups and 0 <= r < rank):
                raise PlotError(
                    f"direction {item!r} is out of range for {layer!r}: groups 0..{groups - 1}, indices 0..{rank - 1}"
                )
            chosen.append((int(g), int(r), "chosen"))
        if not chosen:
            raise PlotError("directions is empty: give at least one (group, index) pair")
    x = capture_input(model, layer, inputs)
    exact = exact_dtype(x.device)
    x = x.to(exact)
    vh = module.Vh.detach().to(x.device, exact)
    with torch.no_grad():
        if module.spatial_dims:
            weight = vh.reshape(groups * rank, *module.base_weight.shape[1:])
            projected = module._apply_weight(x, weight, bias=False)  # channel g * R + r = v_{g,r}^T x_p
            channels = torch.tensor([g * rank + r for g, r, _ in chosen], device=x.device)
            z = projected.index_select(1, channels)
            scale = torch.tensor([float(s[g, r]) for g, r, _ in chosen], dtype=exact, device=x.device)
            maps = z * scale.reshape(1, -1, *(1,) * module.spatial_dims)
        else:
            rows = torch.stack([vh[0, r] for _, r, _ in chosen])
            scale = torch.tensor([float(s[0, r]) for _, r, _ in chosen], dtype=exact, device=x.device)
            maps = F.linear(x, rows) * scale
    if not signed:
        maps = maps.abs()
    found = [Direction(g, r, float(s0[g, r]), float(s[g, r]), kind) for g, r, kind in chosen]
    return SubspaceActivations(layer, groups, found, maps.to("cpu", torch.float64), signed, by)


# ------------------------------------------------------------------------------------------------ drawing
def _matplotlib() -> Any:
    try:
        import matplotlib  # the package first: its submodules may be cached while it is gone
        import matplotlib.figure
    except ImportError:
        raise ImportError(
            "svftune.plots needs matplotlib to draw: pip install 'svftune[plots]' (or pip install matplotlib)"
        ) from None
    return matplotlib.figure


def _fmt_change(delta: float, relative: float | None) -> str:
    text = f"{delta:+.3g}"
    if relative is not None and math.isfinite(relative):
        text += f" ({100 * relative:+.1f}%)"
    return text


def plot_singular_value_changes(
    changes: LayerChanges | Mapping[str, LayerChanges],
    *,
    layer: str | None = None,
    top: int = 8,
    title: str | None = None,
) -> Figure:
    """Figure 6 style: one layer's singular-value changes.

    Left: every listed change, sorted from the largest increase to the largest decrease (``S - S0`` or the
    relative change, whichever ``changes`` was ranked by). Right: bars of the ``top`` largest increases and
    decreases, labelled ``r`` (or ``g:r``) and, when known, ``S0 -> S``.

    Args:
        changes: one layer's ``LayerChanges``, or the dict ``singular_value_changes`` returns.
        layer: which layer of the dict (default: its only one, or the one with the largest ``|change|``).
        top: how many increases and decreases get a bar.
        title: the figure title (default: the layer name).

    Returns:
        A figure with two axes.
    """
    if not isinstance(changes, LayerChanges):
        if not changes:
            raise PlotError("no layer to plot: the changes are empty")
        if layer is None:
            layer = max(changes, key=lambda n: float(changes[n].key.abs().max()) if len(changes[n]) else 0.0)
        elif layer not in changes:
            raise PlotError(f"no layer {layer!r} in the changes; {_listing(list(changes))}")
        changes = changes[layer]
    if len(changes) == 0:
        raise PlotError(f"{changes.name}: nothing to plot (no singular values listed)")
    if top < 1:
        raise PlotError(f"top must be at least 1, got {top}")
    mfigure = _matplotlib()
    relative = changes.by == "relative"
    values = changes.key.numpy() * (100 if relative else 1)
    unit = "(S - S0) / S0, %" if relative else "S - S0"
    fig = mfigure.Figure(figsize=(9.0, 3.4), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.2]})
    colors = ["tab:blue" if v >= 0 else "tab:red" for v in values]
    left.bar(range(len(values)), values, width=1.0, color=colors, linewidth=0)
    left.axhline(0, color="black", linewidth=0.6)
    shown = "all" if len(changes) == changes.total else f"{len(changes)} of {changes.total}"
    left.set_title(f"sorted changes ({shown} values)", fontsize=9)
    left.set_xlabel("rank of the change", fontsize=8)
    left.set_ylabel(unit, fontsize=8)
    left.tick_params(labelsize=7)

    n = len(changes)
    picks = list(range(min(top, n)))
    picks += [i for i in range(max(n - top, 0), n) if i not in picks]
    picks = [i for i in picks if values[i] != 0] or picks
    labels = []
    for i in picks:
        prefix = "r=" if changes.groups == 1 else "g=" if changes.rank == 1 else "g:r="
        text = prefix + changes.label(i)
        if changes.s0 is not None:
            text += f"  {float(changes.s0[i]):.3g}->{float(changes.s[i]):.3g}"
        labels.append(text)
    bar_values = [values[i] for i in picks]
    ypos = list(range(len(picks)))[::-1]
    right.barh(ypos, bar_values, color=["tab:blue" if v >= 0 else "tab:red" for v in bar_values])
    right.axvline(0, color="black", linewidth=0.6)
    right.set_yticks(ypos, labels, fontsize=7)
    right.set_xlabel(unit, fontsize=8)
    right.tick_params(axis="x", labelsize=7)
    right.set_title(f"largest increases (blue) and decreases (red), top {top}", fontsize=9)
    fig.suptitle(title or changes.name, fontsize=10)
    return fig


def _image_array(image: Any) -> Any:
    """``image`` as an ``(H, W, 3)`` or ``(H, W)`` float numpy array in [0, 1]."""
    import numpy as np

    if isinstance(image, Tensor):
        array = image.detach().to("cpu", torch.float64)
        if array.dim() == 4 and array.shape[0] == 1:
            array = array[0]
        if array.dim() == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.permute(1, 2, 0)
        array = array.numpy()
    else:
        array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise PlotError(f"image must be (H, W), (H, W, 3) or (3, H, W), got shape {tuple(array.shape)}")
    if array.max() > 1.0 + 1e-6:
        array = array / 255.0
    return np.clip(array, 0.0, 1.0)


def plot_subspace_activations(
    image: Any,
    activations: SubspaceActivations,
    *,
    sample: int = 0,
    overlay: bool = True,
    alpha: float = 0.7,
    cmap: str = "inferno",
    title: str | None = None,
) -> Figure:
    """Figures 4-5 style: the image, then one map per direction, grown directions above shrunk ones.

    Each map is upsampled bilinearly to the image size and colour-scaled on its own (from 0, or symmetric
    around 0 for signed maps), so the pictures compare where a direction responds, not how strongly across
    directions; the titles give the direction, ``S - S0`` (relative change) and the map's maximum.

    Args:
        image: the input shown, ``(3, H, W)``/``(H, W, 3)``/``(H, W)`` in [0, 1] (or 0-255), Tensor or array;
            give it un-normalised (the maps are computed from whatever the model was fed).
        activations: from ``subspace_activations`` of a 2-D conv layer.
        sample: which batch element of the maps to show.
        overlay: draw each map over a grey copy of the image (``False``: the map alone).
        alpha: opacity of an overlaid map.
        cmap: matplotlib colour map (signed maps use ``"RdBu_r"``).
        title: the figure title (default: the layer name).

    Returns:
        A figure with ``1 + len(activations.directions)`` axes.
    """
    mfigure = _matplotlib()
    maps = activations.maps
    if maps.dim() != 4:
        raise PlotError(
            f"plot_subspace_activations draws 2-D maps (a Conv2d layer); {activations.layer!r} gave maps of shape "
            f"{tuple(maps.shape)}"
        )
    if not 0 <= sample < maps.shape[0]:
        raise PlotError(f"sample {sample} is out of range: the maps hold {maps.shape[0]} input(s)")
    picture = _image_array(image)
    height, width = picture.shape[:2]
    grey = picture if picture.ndim == 2 else picture @ [0.299, 0.587, 0.114]
    up = F.interpolate(maps[sample : sample + 1], size=(height, width), mode="bilinear", align_corners=False)[0]
    grew, shrank, chosen = (activations.select(k) for k in ("grew", "shrank", "chosen"))
    rows = [r for r in (grew, shrank, chosen) if r]
    columns = max(len(r) for r in rows) + 1
    fig = mfigure.Figure(figsize=(1.9 * columns, 2.05 * len(rows) + 0.3), dpi=100, layout="constrained")
    grid = fig.add_gridspec(len(rows), columns)
    first = fig.add_subplot(grid[:, 0] if len(rows) > 1 else grid[0, 0])
    first.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
    first.set_title("input", fontsize=8)
    first.axis("off")
    names = {id(grew): "grew", id(shrank): "shrank", id(chosen): "chosen"}
    for row, positions in enumerate(rows):
        for column, position in enumerate(positions, start=1):
            axis = fig.add_subplot(grid[row, column])
            direction = activations.directions[position]
            values = up[position].numpy()
            peak = float(abs(values).max()) or 1.0
            if activations.signed:
                norm = {"cmap": "RdBu_r", "vmin": -peak, "vmax": peak}
            else:
                norm = {"cmap": cmap, "vmin": 0.0, "vmax": peak}
            if overlay:
                axis.imshow(grey, cmap="gray", vmin=0, vmax=1)
                axis.imshow(values, alpha=alpha, **norm)
            else:
                axis.imshow(values, **norm)
            label = direction.label(activations.groups)
            change = _fmt_change(direction.delta, direction.relative)
            axis.set_title(f"{names[id(positions)]} {label}\n{change}, max {peak:.3g}", fontsize=7)
            axis.axis("off")
    fig.suptitle(title or f"{activations.layer}: |S v^T x| of single singular directions", fontsize=9)
    return fig


def to_png(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a figure as PNG with the Agg canvas (no pyplot, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
