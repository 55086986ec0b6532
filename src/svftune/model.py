"""Model-level API: apply SVF to a backbone, merge or remove it, count what trains, freeze BatchNorm."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from .layers import SVFLayer, normalize_form, normalize_train, svf_layer_from
from .matching import LayerSelector, select_layers

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, but progress bars are not essential
    tqdm = None

#: Weights (in elements) above which apply_svf shows a progress bar when ``progress=None``.
PROGRESS_THRESHOLD = 20_000_000
_NORM_TYPES = (nn.modules.batchnorm._NormBase,)


@dataclass
class SVFConfig:
    """What apply_svf did to a model; stored on it as ``model.svf_config``."""

    layer_names: list[str]
    train: str = "S"
    form: str = "auto"
    freeze_bn: bool = True
    freeze_others: bool = True
    #: requires_grad of every parameter before apply_svf, restored by merge_svf / unapply_svf.
    original_requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)


class _StayInEval:
    """Stands in for a norm layer's ``train()`` so that ``model.train()`` leaves it in eval mode."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze_batchnorm(model: nn.Module) -> int:
    """Keep every BatchNorm/SyncBatchNorm/InstanceNorm with running stats in eval mode with frozen affine.

    Later ``model.train()`` calls leave them in eval mode. Call it again after
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, which builds new norm layers. Returns how many were frozen.
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
    """Undo :func:`freeze_batchnorm`: norm layers follow ``model.train()`` again."""
    for module in model.modules():
        if isinstance(module.__dict__.get("train"), _StayInEval):
            del module.__dict__["train"]


def svf_layers(model: nn.Module) -> list[tuple[str, SVFLayer]]:
    """Every SVF layer of ``model`` with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SVFLayer)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


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
) -> nn.Module:
    """Replace the selected Conv/Linear layers by SVF layers whose singular values alone train.

    Args:
        model: any PyTorch model.
        layers: which layers to adapt: module-name prefixes (``["layer2", "layer3", "layer4"]``), a regular
            expression matched from the start of the name (``"layer[2-4]"``), or a callable
            ``(name, module) -> bool``. ``None`` adapts every target layer.
        targets: layer types to adapt (default: Conv1d, Conv2d, Conv3d and Linear).
        exclude: names to skip, in the same forms as ``layers``.
        freeze_bn: keep every BatchNorm in eval mode with frozen affine, across later ``model.train()``.
        inplace: modify ``model`` itself; ``False`` adapts a deep copy and leaves ``model`` untouched.
        train: which factors train: ``"S"`` (default), or any of ``"U"``, ``"S"``, ``"V"`` (paper Table 7).
        form: training form, ``"auto"`` (cost model per call), ``"three_op"`` or ``"rebuilt"``.
        freeze_others: freeze every parameter that is not a trained SVF factor (default). ``False`` leaves
            the other parameters' ``requires_grad`` as they were.
        progress: show a progress bar while decomposing; ``None`` shows one for large models.
        decompose: replaces :func:`svftune.thin_svd` for computing each layer's ``(U, S, Vh)``, e.g. a
            decomposition cache (``load_svf(..., cache_dir=...)`` uses this).

    Returns:
        The adapted model (``model`` itself when ``inplace``). Its ``svf_config`` records what was done.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_svf expects a torch.nn.Module, got {type(model).__name__}")
    train, form = normalize_train(train), normalize_form(form)
    selected = select_layers(model, layers, targets, exclude)
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

    previous = getattr(model, "svf_config", None)
    original = dict(previous.original_requires_grad) if previous else {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        original.setdefault(name, parameter.requires_grad)
    if freeze_others:
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    size = sum(module.weight.numel() for _, module in selected)
    show = progress if progress is not None else size >= PROGRESS_THRESHOLD
    iterator = selected
    if show and tqdm is not None:
        iterator = tqdm(selected, desc="SVF: decomposing", unit="layer")
    for name, module in iterator:
        _set_submodule(model, name, svf_layer_from(module, train=train, form=form, decompose=decompose))

    if freeze_bn:
        freeze_batchnorm(model)
    names = (previous.layer_names if previous else []) + [name for name, _ in selected]
    model.svf_config = SVFConfig(names, train, form, freeze_bn, freeze_others, original)
    return model


def _remove_svf(model: nn.Module, merge: bool) -> nn.Module:
    for name, layer in svf_layers(model):
        _set_submodule(model, name, layer.to_plain(merge=merge))
    config = model.__dict__.pop("svf_config", None)
    if config is not None:
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if name in config.original_requires_grad:
                parameter.requires_grad_(config.original_requires_grad[name])
        if config.freeze_bn:
            unfreeze_batchnorm(model)
    return model


def merge_svf(model: nn.Module) -> nn.Module:
    """Replace every SVF layer by a plain layer of its original class carrying the fine-tuned weight.

    The weight is rebuilt in float64 and cast once. ``requires_grad`` flags and BatchNorm behaviour are
    restored to what they were before :func:`apply_svf`. Modifies ``model`` in place and returns it.
    """
    return _remove_svf(model, merge=True)


def unapply_svf(model: nn.Module) -> nn.Module:
    """Restore the original layers with their original weight tensors, bit for bit. In place; returns ``model``."""
    return _remove_svf(model, merge=False)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts.

    ``total`` counts the model as its plain form plus what trains: frozen SVF factors (U, Vh and the
    residual kept for U/V training) are a re-parametrisation of the base weight and are not counted again.
    """
    internal = {
        id(t)
        for _, layer in svf_layers(model)
        for t in (layer.U, layer.S, layer.Vh, layer.residual)
        if t is not None and not t.requires_grad
    }
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in internal:
            continue
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` (the PEFT format)."""
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")
