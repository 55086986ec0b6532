"""Few-shot segmentation models: backbones, the three methods (baseline, PFENet, BAM) and fine-tuning strategies.

    from svf_fss.models import build_model
    model = build_model("baseline", "resnet50_v2", shots=1, strategy="svf", weights="resnet50_v2.pth")
    groups = model.param_groups()          # [{"name": "head", ...}, {"name": "singular_values", "lr_scale": 0.1}]
    out = model(query, support_images, support_masks, query_mask)   # {"logits", "loss", "losses"}
    logits = model(query, support_images, support_masks)            # (B, 2, H, W)

See ``examples/fss/MODELS.md`` for the architecture and every difference from the public code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from .backbones import (
    BACKBONES,
    DILATION_STYLES,
    STAGES,
    Backbone,
    build_backbone,
    check_dilation,
    offline_mobilenet_v2_weights,
)
from .bam import BAM, PSPNet, load_pspnet_weights
from .base import FewShotSegmenter
from .baseline import KSHOT_RULES, Baseline, check_kshot
from .pfenet import COCO_BINS, PASCAL_BINS, PFENet
from .strategies import STRATEGIES, Strategy, apply_strategy, backbone_param_groups, parse_strategy
from .weights import BackboneWeightsError, load_backbone_weights

METHODS = ("baseline", "pfenet", "bam")
BASE_CLASSES = {"pascal": 15, "coco": 60}
WeightsLike = str | Path | Mapping | None


def build_model(
    method: str,
    backbone: str | Backbone = "resnet50_v2",
    shots: int = 1,
    strategy: str | Strategy | None = "frozen",
    *,
    weights: WeightsLike = None,
    dataset: str = "pascal",
    base_learner: WeightsLike | PSPNet = None,
    base_backbone: Backbone | None = None,
    pyramid_bins: Sequence[float] | None = None,
    checkpoint_backbone: bool = False,
    svf_form: str = "auto",
    strategy_layers: Sequence[str] | str | None = None,
    conv_kind: str | None = None,
    dilation: str | None = None,
    kshot: str = "mean",
) -> FewShotSegmenter:
    """Build a few-shot model and apply its backbone strategy.

    Args:
        method: ``"baseline"``, ``"pfenet"`` or ``"bam"``.
        backbone: a name (``resnet50_v2``, ``resnet50``, ``vgg16_bn``, ``mobilenet_v2``) or a built
            :class:`Backbone` (used as is; with ``strategy=None`` its own strategy is kept).
        shots: K.
        strategy: see :mod:`svf_fss.models.strategies` (default ``"frozen"``, the original methods);
            ``None`` leaves a given backbone's strategy alone.
        weights: ImageNet backbone weights (a file or state dict; ``"offline"`` for the bundled MobileNetV2).
        dataset: ``"pascal"`` or ``"coco"``: PFENet's bins (absolute 60/30/15/8 vs relative) and BAM's base
            classes (15 vs 60).
        base_learner: BAM only: the stage-1 PSPNet (a trained :class:`PSPNet` or its checkpoint file). Its
            backbone becomes the meta learner's backbone; ``weights`` must then be ``None``. Without it the
            base learner is random (for tests).
        base_backbone: BAM only: an explicit frozen backbone for the base learner (e.g. when ``backbone`` already
            carries SVF).
        pyramid_bins: PFENet's FEM bins, overriding the dataset default.
        checkpoint_backbone: recompute backbone stages in the backward (activation checkpointing).
        svf_form: svftune training form for SVF strategies.
        strategy_layers, conv_kind: override the strategy's stages / conv kind.
        dilation: the ResNets' dilation style when ``backbone`` is a name: ``"pspnet"`` (``None`` = this default;
            every 3x3 conv of layer3/layer4 dilated 2/4, PFENet's and BAM's code) or ``"torchvision"`` (the first
            block of layer3/layer4 keeps 1/2, the SVF release's baseline and PFENet); see
            :func:`svf_fss.models.backbones.dilate_resnet`. A built backbone (or BAM's trained PSPNet) keeps its own;
            naming a different style for it is an error.
        kshot: baseline only: ``"mean"`` (default) or ``"sum"`` (the SVF release's rule) over the shots' prototypes
            and priors. PFENet averages and BAM weights its shots whatever this says; they refuse ``"sum"``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if dataset not in BASE_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}: choose 'pascal' or 'coco'")
    if dilation is not None:
        check_dilation(dilation)
        given = base_learner.backbone if isinstance(base_learner, PSPNet) else backbone
        if isinstance(given, Backbone) and given.dilation not in (None, dilation):
            raise ValueError(
                f"dilation={dilation!r}, but the given {given.name} backbone is dilated {given.dilation!r}: "
                "build it with that style (build_backbone(..., dilation=...)) or drop dilation="
            )
    if check_kshot(kshot) != "mean" and method != "baseline":
        raise ValueError(f"kshot={kshot!r} is the baseline's option; {method} combines its shots its own way")
    if method == "bam" and base_learner is not None and weights is not None:
        raise ValueError("BAM takes its backbone from the base learner (stage-1 PSPNet): drop weights=")
    if method == "bam" and isinstance(base_learner, PSPNet):
        name = backbone if isinstance(backbone, str) else backbone.name
        if name != base_learner.backbone.name or (
            isinstance(backbone, Backbone) and backbone is not base_learner.backbone
        ):
            raise ValueError(f"backbone {name!r} is not the base learner's backbone ({base_learner.backbone.name!r})")
        backbone = base_learner.backbone
    elif isinstance(backbone, str):
        backbone = build_backbone(backbone, weights=weights, dilation=dilation or "pspnet")
    elif weights is not None:
        load_backbone_weights(backbone, weights)

    if method == "baseline":
        model: FewShotSegmenter = Baseline(backbone, shots, kshot=kshot)
    elif method == "pfenet":
        bins = pyramid_bins or (PASCAL_BINS if dataset == "pascal" else COCO_BINS)
        model = PFENet(backbone, shots, bins=bins)
    else:
        base_classes = BASE_CLASSES[dataset]
        if base_learner is None:
            model = BAM(backbone, shots, base_classes=base_classes, base_backbone=base_backbone)
        else:
            pspnet = base_learner if isinstance(base_learner, PSPNet) else PSPNet(backbone, base_classes + 1)
            if not isinstance(base_learner, PSPNet):
                load_pspnet_weights(pspnet, base_learner)
            model = BAM.from_pspnet(pspnet, shots, base_backbone=base_backbone)
    if strategy is not None:
        model.set_strategy(strategy, layers=strategy_layers, conv_kind=conv_kind, form=svf_form)
    elif model.backbone.strategy is None:
        raise ValueError("strategy=None keeps the backbone's own strategy, but it has none: pass one")
    model.backbone.checkpoint_stages = checkpoint_backbone
    return model


def build_pspnet(
    backbone: str | Backbone = "resnet50_v2",
    dataset: str = "pascal",
    *,
    weights: WeightsLike = None,
    dilation: str = "pspnet",
) -> PSPNet:
    """BAM's stage-1 base learner: a PSPNet over the dataset's base classes + background (16 Pascal, 61 COCO),
    its backbone loaded from ImageNet ``weights``. It trains whole (BatchNorm in training mode), as in BAM.
    ``dilation``: the ResNets' dilation style (BAM's code and the SVF release's PSPNet: ``"pspnet"``)."""
    if dataset not in BASE_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}: choose 'pascal' or 'coco'")
    if isinstance(backbone, str):
        backbone = build_backbone(backbone, weights=weights, dilation=dilation)
    elif weights is not None:
        load_backbone_weights(backbone, weights)
    return PSPNet(backbone, BASE_CLASSES[dataset] + 1)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by group name, plus ``"total"`` (all parameters)."""
    counts = {group["name"]: sum(p.numel() for p in group["params"]) for group in model.param_groups()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


__all__ = [
    "BACKBONES",
    "BAM",
    "BASE_CLASSES",
    "COCO_BINS",
    "DILATION_STYLES",
    "KSHOT_RULES",
    "METHODS",
    "PASCAL_BINS",
    "STAGES",
    "STRATEGIES",
    "Backbone",
    "BackboneWeightsError",
    "Baseline",
    "FewShotSegmenter",
    "PFENet",
    "PSPNet",
    "Strategy",
    "apply_strategy",
    "backbone_param_groups",
    "build_backbone",
    "build_model",
    "build_pspnet",
    "count_parameters",
    "load_backbone_weights",
    "load_pspnet_weights",
    "offline_mobilenet_v2_weights",
    "parse_strategy",
]
