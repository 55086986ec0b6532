"""Model-level API: apply SVF to a backbone, merge or remove it, count what trains, freeze BatchNorm."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from . import _interop, ties
from .errors import SVFConfigError
from .layers import SVFLayer, normalize_form, normalize_train, svf_layer_from
from .matching import LayerSelector, peft_owned_names, select_layers, selected_modules

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, but progress bars are not essential
    tqdm = None

PROGRESS_THRESHOLD = 20_000_000
"""Weights (in elements) from which ``apply_svf`` shows a progress bar when ``progress=None``."""
_NORM_TYPES = (nn.modules.batchnorm._NormBase,)


@dataclass
class SVFConfig:
    """What ``apply_svf`` did to a model; stored on it as ``model.svf_config``.

    A second ``apply_svf`` call on the same model (other layers) extends the record; ``merge_svf`` and
    ``unapply_svf`` remove it. ``svftune.save_svf`` writes ``train``, ``form``, ``freeze_bn``,
    ``freeze_others`` and ``tied`` into the checkpoint, so that ``svftune.load_svf`` applies SVF the same way.

    Attributes:
        layer_names: names of the adapted layers, in the order they were adapted.
        train: which factors train, normalised to a subset of ``"USV"`` in that order (``"S"`` by default).
        form: the training form the layers were built with: ``"auto"``, ``"three_op"``, ``"rebuilt"`` or
            ``"lean"``.
        freeze_bn: whether BatchNorm-like layers were frozen (see ``freeze_batchnorm``).
        freeze_others: whether every parameter that is not a trained SVF factor was frozen.
        original_requires_grad: ``requires_grad`` of every parameter (by name) before the first ``apply_svf``,
            restored by ``merge_svf`` and ``unapply_svf``.
        tied: how shared weights were handled, ``"error"`` or ``"keep"`` (see ``svftune.ties``).
        modules_to_save: names of the modules that train fully (``apply_svf(modules_to_save=...)``); read them
            with ``svftune.model.modules_to_save(model)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> _ = torch.manual_seed(0)
        >>> model = svftune.apply_svf(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), layers=["2"])
        >>> model.svf_config.layer_names, model.svf_config.train, model.svf_config.form
        (['2'], 'S', 'auto')
    """

    layer_names: list[str]
    train: str = "S"
    form: str = "auto"
    freeze_bn: bool = True
    freeze_others: bool = True
    #: requires_grad of every parameter before apply_svf, restored by merge_svf / unapply_svf.
    original_requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)
    tied: str = "error"
    modules_to_save: list[str] = field(default_factory=list)

    #: The fields a checkpoint stores (``to_json``), with their defaults for files that predate a field.
    JSON_DEFAULTS: ClassVar[dict[str, Any]] = {"tied": "error"}
    _JSON_TYPES: ClassVar[dict[str, type]] = {
        "train": str,
        "form": str,
        "freeze_bn": bool,
        "freeze_others": bool,
        "tied": str,
    }

    def to_json(self) -> dict[str, Any]:
        """The settings ``save_svf`` stores so that ``load_svf`` applies SVF the same way (a JSON-able dict).

        Examples:
            >>> from svftune.model import SVFConfig
            >>> stored = SVFConfig(["layer4.0.conv2"], train="s").to_json()
            >>> stored
            {'train': 'S', 'form': 'auto', 'freeze_bn': True, 'freeze_others': True, 'tied': 'error'}
            >>> SVFConfig.from_json(stored) == SVFConfig([], train="S")
            True
        """
        return {
            "train": normalize_train(self.train),
            "form": normalize_form(self.form),
            "freeze_bn": bool(self.freeze_bn),
            "freeze_others": bool(self.freeze_others),
            "tied": ties.normalize_tied(self.tied),
        }

    @classmethod
    def from_json(cls, raw: Any, layer_names: Sequence[str] = ()) -> SVFConfig:
        """Check a mapping written by ``to_json`` (read from a file: untrusted) and build its config.

        Every field must be present with its type (``JSON_DEFAULTS`` fills fields older files lack) and a valid
        value; no other key is allowed.

        Args:
            raw: the parsed mapping.
            layer_names: the adapted layers' names, for the returned config.

        Raises:
            SVFConfigError: naming the first wrong field.
        """
        if not isinstance(raw, dict):
            raise SVFConfigError("", "a mapping", raw)
        unknown = sorted(str(k) for k in raw if k not in cls._JSON_TYPES)
        if unknown:
            raise SVFConfigError(unknown[0], "absent (not a stored SVFConfig field)", raw[unknown[0]])
        values = {**cls.JSON_DEFAULTS, **raw}
        for key, kind in cls._JSON_TYPES.items():
            if key not in values:
                raise SVFConfigError(key, f"a {kind.__name__} (the field is missing)", None)
            if not isinstance(values[key], kind):
                raise SVFConfigError(key, f"a {kind.__name__}", values[key])
        for key, normalize in (("train", normalize_train), ("form", normalize_form), ("tied", ties.normalize_tied)):
            try:
                values[key] = normalize(values[key])
            except ValueError as err:
                raise SVFConfigError(key, f"a valid value ({err})", values[key]) from None
        return cls(list(layer_names), **values)


class _StayInEval:
    """Stands in for a norm layer's ``train()`` so that ``model.train()`` leaves it in eval mode."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze_batchnorm(model: nn.Module) -> int:
    """Keep every BatchNorm/SyncBatchNorm/InstanceNorm layer of ``model`` in eval mode with frozen affine.

    SVF trains with BatchNorm frozen: running statistics instead of batch statistics, and no trainable affine
    parameters. Every norm layer derived from ``torch.nn.modules.batchnorm._NormBase`` (BatchNorm1d/2d/3d,
    SyncBatchNorm, InstanceNorm1d/2d/3d, their lazy forms) is put in eval mode, its ``weight``/``bias`` get
    ``requires_grad=False``, and later ``model.train()`` calls leave it in eval mode. ``apply_svf`` calls this
    when ``freeze_bn=True`` (the default). ``nn.SyncBatchNorm.convert_sync_batchnorm`` builds new norm layers:
    call ``freeze_batchnorm`` again after it.

    Args:
        model: the model whose norm layers to freeze (the model itself counts when it is one).

    Returns:
        How many norm layers were frozen.

    Examples:
        >>> from torch import nn
        >>> import svftune
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> svftune.freeze_batchnorm(model)
        1
        >>> model.train()[1].training, model[1].weight.requires_grad
        (False, False)
        >>> svftune.unfreeze_batchnorm(model)
        >>> model.train()[1].training
        True
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            module.__dict__["train"] = _StayInEval(module)
            nn.Module.train(module, False)
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)
            count += 1
    return count


def unfreeze_batchnorm(model: nn.Module) -> None:
    """Undo the mode freezing of ``freeze_batchnorm``: norm layers follow ``model.train()`` again.

    Only the mode is released; the layers keep their current mode until the next ``model.train()`` /
    ``model.eval()``, and their affine parameters keep ``requires_grad=False`` (``merge_svf`` and
    ``unapply_svf`` restore the flags that were in place before ``apply_svf``).

    Args:
        model: the model whose norm layers to release.
    """
    for module in model.modules():
        if isinstance(module.__dict__.get("train"), _StayInEval):
            del module.__dict__["train"]


def svf_layers(model: nn.Module) -> list[tuple[str, SVFLayer]]:
    """Every SVF layer of ``model`` with its module name, in ``model.named_modules()`` order.

    Args:
        model: any model.

    Returns:
        ``(name, layer)`` pairs for every ``svftune.SVFLayer`` inside ``model`` (empty when SVF is not
        applied).

    Examples:
        >>> from torch import nn
        >>> import svftune
        >>> model = svftune.apply_svf(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> [(name, type(layer).__name__) for name, layer in svftune.svf_layers(model)]
        [('0', 'SVFLinear'), ('2', 'SVFLinear')]
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SVFLayer)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def modules_to_save(model: nn.Module) -> list[str]:
    """Names of the modules ``apply_svf(..., modules_to_save=...)`` made train fully (empty when none).

    The record lives in ``model.svf_config.modules_to_save``; checkpoint code reads it through this function.

    Args:
        model: any model.

    Returns:
        The module names, in model order.

    Examples:
        >>> from torch import nn
        >>> import svftune
        >>> from svftune.model import modules_to_save
        >>> model = svftune.apply_svf(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1)),
        ...                           layers=["0"], modules_to_save=["2"])
        >>> modules_to_save(model), [n for n, p in model.named_parameters() if p.requires_grad]
        (['2'], ['0.S', '2.weight', '2.bias'])
    """
    config = model.__dict__.get("svf_config")
    return list(config.modules_to_save) if config is not None else []


def _require_svf(model: nn.Module, verb: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb} expects a torch.nn.Module, got {type(model).__name__}")
    if not svf_layers(model):
        raise ValueError(
            f"{verb}: the model has no SVF layers (svftune.apply_svf was not called on it, or merge_svf / "
            "unapply_svf already removed them), so there is nothing to remove"
        )


def apply_svf(
    model: nn.Module,
    layers: LayerSelector = None,
    *,
    targets: Sequence[type[nn.Module]] | None = None,
    exclude: LayerSelector = None,
    freeze_bn: bool = True,
    inplace: bool = True,
    train: str = "S",
    form: str = "auto",
    freeze_others: bool = True,
    progress: bool | None = None,
    decompose: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None,
    tied: str = "error",
    modules_to_save: Sequence[str] | None = None,
) -> nn.Module:
    """Replace the selected Conv/Linear layers by SVF layers whose singular values alone train.

    Each selected weight is decomposed as ``W = U diag(S) Vh`` (full thin SVD per group, no truncation) and the
    layer is replaced by an ``svftune.SVFLinear`` / ``svftune.SVFConv2d`` (1d/3d) that applies
    ``W + U diag(S - S0) Vh``: while ``S`` is untouched the model computes exactly what it computed before.
    Every other parameter is frozen (``freeze_others``) and BatchNorm is kept in eval mode (``freeze_bn``).

    Args:
        model: any PyTorch model.
        layers: which layers to adapt: module paths (``["layer2", "layer3", "layer4"]``: those modules and everything
            inside), PEFT-style names for entries that are no path from the root (``["q_proj", "v_proj"]``: every
            module whose name ends with ``.q_proj`` or ``.v_proj``), ``"all-linear"`` (every Linear-like layer but
            the output layer), a regular expression matched from the start of the name (``"layer[2-4]"``), or a
            callable ``(name, module) -> bool``. ``None`` adapts every target layer. See ``svftune.matching``.
        targets: layer types to adapt (default: every supported type, ``svftune.layers.LAYER_KINDS``: Linear,
            Conv1d/2d/3d and transformers' Conv1D).
        exclude: names to skip, in the same forms as ``layers``.
        freeze_bn: keep every BatchNorm in eval mode with frozen affine, across later ``model.train()``.
        inplace: modify ``model`` itself; ``False`` adapts a deep copy and leaves ``model`` untouched.
        train: which factors train: ``"S"`` (default), or any of ``"U"``, ``"S"``, ``"V"`` (paper Table 7).
        form: training form of every adapted layer: ``"auto"`` (the default: a cost model picks three-op or
            rebuilt on every training call from the input's shape), ``"three_op"`` (the paper's form: ``Vh``
            projection, scale by ``S``, ``U`` projection; saves the ``R``-channel projection for the backward),
            ``"rebuilt"`` (one conv with the rebuilt weight; the backward computes a full weight gradient) or
            ``"lean"`` (three-op that recomputes the ``Vh`` projection in the backward instead of saving it:
            one more conv per step, lower memory). Eval-mode and no-grad forwards always use the rebuilt weight.
        freeze_others: freeze every parameter that is not a trained SVF factor (default), except the parameters
            of another adapter (PEFT tuner layers such as LoRA's, PEFT ``modules_to_save`` wrappers), which keep
            their ``requires_grad``. ``False`` leaves every other parameter's ``requires_grad`` as it was.
        progress: show a progress bar while decomposing; ``None`` shows one for large models.
        decompose: replaces ``svftune.thin_svd`` for computing each layer's ``(U, S, Vh)``, e.g. a
            decomposition cache (``load_svf(..., cache_dir=...)`` uses this).
        tied: what to do with a selected weight that another module also holds (tied embeddings and heads, a
            block reused at several places): ``"error"`` (the default) refuses with a message naming both places;
            ``"keep"`` adapts it once and keeps every holder on the adapted weight, through training, save/load
            and ``merge_svf`` (see ``svftune.ties``).
        modules_to_save: modules that train fully (every parameter, norm layers in training mode), as PEFT's
            ``modules_to_save``: names in the list form of ``layers`` (``["classifier"]``, ``["roi_heads",
            "rpn"]``). Recorded in ``model.svf_config.modules_to_save`` (``svftune.model.modules_to_save``).

    Returns:
        The adapted model (``model`` itself when ``inplace``). Its ``svf_config`` (``SVFConfig``) records
        what was done.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; a selector or ``targets`` has the wrong type; a selected
            layer cannot be adapted (transposed conv, a subclass that overrides ``forward``, a parametrized
            layer, a layer with hooks); the message names the layer.
        ValueError: an entry of ``layers``/``exclude``/``modules_to_save`` matches nothing, nothing is selected,
            SVF is already applied to a selected layer, a selected weight is shared and ``tied="error"``, a module
            to save contains selected layers, the model still has uninitialised lazy parameters, or ``train`` /
            ``form`` / ``tied`` is not valid.

    Warns:
        svftune.matching.SVFSelectionWarning: the selection passed over layers that hold a weight matrix of an
            unsupported type, or layers that a PEFT adapter owns.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> reference = model.eval()(x)
        >>> model = svftune.apply_svf(model, layers=["3"])
        >>> type(model[3]).__name__, tuple(model[3].S.shape)
        ('SVFConv2d', (1, 16))
        >>> [name for name, p in model.named_parameters() if p.requires_grad]
        ['3.S']
        >>> model.train()[1].training  # BatchNorm stays frozen
        False
        >>> torch.equal(model.eval()(x), reference)  # untouched singular values: exactly the original model
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_svf expects a torch.nn.Module, got {type(model).__name__}")
    train, form, tied = normalize_train(train), normalize_form(form), ties.normalize_tied(tied)
    selected = select_layers(model, layers, targets, exclude)
    saved = selected_modules(model, modules_to_save, "modules_to_save") if modules_to_save is not None else []
    inside = [n for n, _ in selected if any(n == s or n.startswith(s + ".") for s in saved)]
    if inside:
        raise ValueError(
            f"modules_to_save={list(modules_to_save)!r} contains layers selected for SVF ({', '.join(inside[:3])}): "
            "a module trains either fully or through its singular values; exclude those layers or save less"
        )
    shared = ties.shared_places(model, selected)
    if tied == "error":
        ties.refuse(shared)
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"the model has lazy parameters that are not initialised yet ({', '.join(lazy[:3])}): run one "
            "forward pass with a sample batch before apply_svf, so every weight exists and can be frozen"
        )
    if not inplace:
        names = [name for name, _ in selected]
        model = copy.deepcopy(model)
        selected = [(name, model.get_submodule(name)) for name in names]

    previous = model.__dict__.get("svf_config")
    original = dict(previous.original_requires_grad) if previous else {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        original.setdefault(name, parameter.requires_grad)
    if freeze_others:
        adapters = {id(p) for name in peft_owned_names(model) for p in model.get_submodule(name).parameters()}
        for parameter in model.parameters():
            if id(parameter) not in adapters:  # another adapter's own parameters are not "others"
                parameter.requires_grad_(False)

    adapt, places = ties.plan_keep(model, selected)
    size = sum(module.weight.numel() for _, module in adapt)
    show = progress if progress is not None else size >= PROGRESS_THRESHOLD
    iterator = adapt
    if show and tqdm is not None:
        iterator = tqdm(adapt, desc="SVF: decomposing", unit="layer")
    for name, module in iterator:
        layer = svf_layer_from(module, train=train, form=form, decompose=decompose)
        for path in places[id(module)]:
            _set_submodule(model, path, layer)
        if name in shared:
            ties.tie_holders(model, layer.base_weight, layer, module)

    if freeze_bn:
        freeze_batchnorm(model)
    for name in saved:  # trains fully: every parameter, norm layers follow model.train()
        module = model.get_submodule(name)
        unfreeze_batchnorm(module)
        module.requires_grad_(True)
    names = (previous.layer_names if previous else []) + [name for name, _ in adapt]
    saved = (previous.modules_to_save if previous else []) + [
        n for n in saved if n not in (previous.modules_to_save if previous else [])
    ]
    model.svf_config = SVFConfig(names, train, form, freeze_bn, freeze_others, original, tied, saved)
    _interop.after_apply(model)
    return model


def _remove_svf(model: nn.Module, merge: bool) -> nn.Module:
    for layer, paths in ties.layer_places(model).values():
        plain = layer.to_plain(merge=merge)
        for path in paths:
            _set_submodule(model, path, plain)
        ties.release(layer, plain)
    config = model.__dict__.pop("svf_config", None)
    if config is not None:
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if name in config.original_requires_grad:
                parameter.requires_grad_(config.original_requires_grad[name])
        if config.freeze_bn:
            unfreeze_batchnorm(model)
    _interop.after_remove(model)
    return model


def merge_svf(model: nn.Module) -> nn.Module:
    """Replace every SVF layer by a plain layer of its original class carrying the fine-tuned weight.

    The weight ``W + U diag(S - S0) Vh`` is rebuilt in float64 (float32 on devices without float64) and cast once
    to the layer's dtype; an untouched layer gets a copy of its original weight. ``requires_grad`` flags and
    BatchNorm behaviour are restored to what they were before ``apply_svf``, and ``model.svf_config`` is
    removed. The result has no dependency on svftune: save it with ``torch.save`` or export it as usual.

    Args:
        model: a model with SVF applied; modified in place.

    Returns:
        ``model``, now made of plain layers again. Weights shared with ``tied="keep"`` are one merged
        ``Parameter`` at every place again.

    Raises:
        ValueError: the model has no SVF layers (nothing to merge).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> _ = torch.manual_seed(0)
        >>> model = svftune.apply_svf(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)))
        >>> with torch.no_grad():
        ...     _ = model[2].S.mul_(1.5)  # stands in for training
        ...     x = torch.randn(1, 3, 6, 6)
        ...     tuned = model(x)
        >>> plain = svftune.merge_svf(model)
        >>> type(plain[2]).__name__, all(p.requires_grad for p in plain.parameters())
        ('Conv2d', True)
        >>> torch.allclose(plain(x), tuned, atol=1e-6)
        True
    """
    _require_svf(model, "merge_svf")
    return _remove_svf(model, merge=True)


def unapply_svf(model: nn.Module) -> nn.Module:
    """Undo ``apply_svf``: restore the original layers with their original weight tensors, bit for bit.

    Whatever the singular values were trained to is discarded (use ``merge_svf`` to keep it, or
    ``svftune.save_svf`` first). The original ``Parameter`` objects come back (not copies), with their
    ``requires_grad`` flags and BatchNorm behaviour as before ``apply_svf``.

    Args:
        model: a model with SVF applied; modified in place.

    Returns:
        ``model``, with its original layers.

    Raises:
        ValueError: the model has no SVF layers (nothing to remove).

    Examples:
        >>> from torch import nn
        >>> import svftune
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> weight = model[0].weight
        >>> model = svftune.unapply_svf(svftune.apply_svf(model))
        >>> type(model[0]).__name__, model[0].weight is weight, weight.requires_grad
        ('Linear', True, True)
    """
    _require_svf(model, "unapply_svf")
    return _remove_svf(model, merge=False)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Count the parameters that train and all parameters of ``model``.

    ``total`` counts the model as its plain form plus what trains: frozen SVF factors (``U``, ``Vh`` and the
    residual kept for U/V training) are a re-parametrisation of the base weight and are not counted again, and
    shared parameters are counted once.

    Args:
        model: any model, with or without SVF applied.

    Returns:
        ``(trainable, total)``: elements of the parameters with ``requires_grad`` and of all parameters.

    Examples:
        >>> from torch import nn
        >>> import svftune
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3))
        >>> svftune.trainable_parameters(model)
        (1408, 1408)
        >>> model = svftune.apply_svf(model)  # ranks min(8, 3*3*3) = 8 and min(16, 8*3*3) = 16
        >>> svftune.trainable_parameters(model)
        (24, 1432)
    """
    internal = {id(t) for _, layer in svf_layers(model) for t in layer.factor_tensors().values() if not t.requires_grad}
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in internal:
            continue
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts of ``trainable_parameters`` in the PEFT format.

    Args:
        model: any model, with or without SVF applied.

    Examples:
        >>> from torch import nn
        >>> import svftune
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3))
        >>> svftune.print_trainable_parameters(svftune.apply_svf(model))
        trainable params: 24 || all params: 1,432 || trainable%: 1.6760
    """
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")
