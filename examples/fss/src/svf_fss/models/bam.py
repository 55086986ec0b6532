"""BAM (Lang et al., CVPR 2022): a PSPNet base learner trained on the base classes (stage 1), a meta learner
(= the SVF baseline), the Gram-matrix scene adjustment, K-shot weighting and the learner ensemble (stage 2).

Stage 1 is :class:`PSPNet` (train it like any segmentation network on base-class labels). Stage 2 is :class:`BAM`,
built from a trained PSPNet with :meth:`BAM.from_pspnet` (or :func:`svf_fss.models.build_model`): its backbone
starts from the PSPNet's fine-tuned backbone, and the base learner (PPM + classifier) stays frozen. When a
strategy changes the backbone (SVF, fine-tuning, adapters), the base learner keeps its own frozen, undecomposed copy
of the backbone, so it always sees the features it was trained on.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import svftune

from .backbones import STAGES, Backbone
from .base import FewShotSegmenter, finish
from .baseline import MetaLearner
from .common import gram_distance, resize
from .weights import BackboneWeightsError, read_state_dict

PSP_BINS = (1, 2, 3, 6)


class PPM(nn.Module):
    """Pyramid pooling: per bin, adaptive average pool -> 1x1 conv (no bias) -> BN -> ReLU, upsampled back;
    output = ``cat(x, branches)`` (2 x ``cin`` channels with ``cin / len(bins)`` per branch).

    Its parameter names (``features.i.1`` conv, ``features.i.2`` BN) match BAM's checkpoints."""

    def __init__(self, cin: int, bins: Sequence[int] = PSP_BINS) -> None:
        super().__init__()
        reduction = cin // len(bins)
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b), nn.Conv2d(cin, reduction, 1, bias=False), nn.BatchNorm2d(reduction), nn.ReLU()
            )
            for b in bins
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat([x, *(resize(branch(x), size) for branch in self.features)], dim=1)


class PSPHead(nn.Module):
    """PSPNet head: PPM (bins 1, 2, 3, 6) then 3x3 conv (no bias) -> BN -> ReLU -> Dropout2d(0.1) -> 1x1 conv."""

    def __init__(self, cin: int, classes: int, bins: Sequence[int] = PSP_BINS) -> None:
        super().__init__()
        self.ppm = PPM(cin, bins)
        self.cls = nn.Sequential(
            nn.Conv2d(2 * cin, 512, 3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.1),
            nn.Conv2d(512, classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.ppm(x))


class PSPNet(nn.Module):
    """BAM's stage-1 base learner: backbone + :class:`PSPHead` over ``classes`` = base classes + background
    (16 for Pascal-5i, 61 for COCO-20i). The whole network trains (BatchNorm in training mode), as in BAM.

    ``model(image)`` returns logits at the image's resolution; ``model(image, label)`` returns
    ``{"logits", "loss", "losses"}`` with cross-entropy over ``label`` (255 ignored).
    """

    def __init__(self, backbone: Backbone, classes: int = 16, bins: Sequence[int] = PSP_BINS) -> None:
        super().__init__()
        self.backbone = backbone
        self.classes = classes
        self.head = PSPHead(backbone.channels[4], classes, bins)

    def forward(self, image: Tensor, label: Tensor | None = None):
        x = image
        for index in range(5):
            x = self.backbone.stage(index, x)
        logits = resize(self.head(x), image.shape[-2:])
        return finish(logits, label, {"main": (1.0, logits, label)})

    def param_groups(self) -> list[dict]:
        """``head`` (lr_scale 1) and ``backbone`` (lr_scale 0.1: BAM's 2.5e-3 head / 2.5e-4 encoder on Pascal)."""
        return [
            {"name": "head", "params": [p for p in self.head.parameters() if p.requires_grad], "lr_scale": 1.0},
            {"name": "backbone", "params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_scale": 0.1},
        ]


def load_pspnet_weights(model: PSPNet, source: str | Path | Mapping) -> None:
    """Load a PSPNet checkpoint: this package's layout (``backbone.*``, ``head.*``) or BAM's
    (``layer0..4``, ``ppm.*``, ``cls.*``, with ``encoder.*`` aliases), wrapped or ``module.``-prefixed; strict."""
    state, notes = read_state_dict(source)
    if not any(k.startswith("backbone.") for k in state):
        renamed = {}
        for key, value in state.items():
            head = key.partition(".")[0]
            if head in STAGES:
                renamed[f"backbone.{key}"] = value
            elif head in ("ppm", "cls"):
                renamed[f"head.{key}"] = value
            elif head != "encoder":  # BAM registers the backbone twice: layerN and encoder.N
                renamed[key] = value
        state = renamed
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mis_shaped = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or mis_shaped:
        raise BackboneWeightsError(
            f"cannot load the PSPNet base learner ({model.backbone.name}, {model.classes} classes) "
            f"[{'; '.join(notes) or 'no unwrapping'}]:\n  missing: {missing[:8]} ({len(missing)})\n"
            f"  unexpected: {unexpected[:8]} ({len(unexpected)})\n  shape mismatches: {mis_shaped[:8]} "
            f"({len(mis_shaped)})\n  (a different backbone, or a different number of base classes: Pascal 16, "
            "COCO 61?)"
        )
    merged = dict(target)
    merged.update(state)
    model.load_state_dict(merged, strict=True)


def kshot_weights(distances: Tensor, reweight: nn.Module | None) -> Tensor:
    """BAM's K-shot weighting: sort each episode's Gram distances, map them with ``reweight`` (1x1 convs over
    the K sorted values), put the outputs back in the original shot order, softmax over shots.
    ``(B, K) -> (B, K)``; ones for a single shot."""
    if reweight is None or distances.shape[1] == 1:
        return torch.ones_like(distances)
    values, order = distances.sort(dim=1)
    weights = reweight(values[:, :, None, None])[:, :, 0, 0]
    inverse = order.argsort(dim=1)
    return torch.softmax(weights.gather(1, inverse), dim=1)


def base_foreground(probabilities: Tensor, episode_class: Tensor | None) -> Tensor:
    """Sum of the base learner's base-class probabilities (channels 1..), without ``episode_class`` (its channel
    index, one per episode) when given: BAM excludes the episode's own class in training."""
    keep = torch.ones(probabilities.shape[:2], dtype=probabilities.dtype, device=probabilities.device)
    keep[:, 0] = 0
    if episode_class is not None:
        keep[torch.arange(len(keep), device=keep.device), episode_class.long().to(keep.device)] = 0
    return (probabilities * keep[:, :, None, None]).sum(dim=1, keepdim=True)


def _merge_conv() -> nn.Conv2d:
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1))
    return conv


class BAM(FewShotSegmenter):
    """BAM stage 2. Loss = final CE + meta CE + base CE (the last only when ``base_label`` is given; it has no
    gradient, the base learner being frozen).

    Args:
        backbone: the meta learner's backbone (the PSPNet's, fine-tuned in stage 1).
        shots: K; BAM's K-shot weighting has parameters per K, so a model serves one K.
        base_head: the trained PSPNet head; a fresh one (random) when ``None``.
        base_classes: base classes (15 Pascal, 60 COCO); the head predicts them + background.
        base_backbone: the base learner's own frozen backbone; ``None`` shares ``backbone`` while it is frozen
            (a copy is made by :meth:`set_strategy` when a strategy changes the backbone).
        kshot_hidden: hidden channels of the K-shot weighting (BAM's ``kshot_trans_dim``, 2).
    """

    method = "bam"
    fixed_shots = True

    def __init__(
        self,
        backbone: Backbone,
        shots: int = 1,
        base_head: PSPHead | None = None,
        base_classes: int = 15,
        base_backbone: Backbone | None = None,
        kshot_hidden: int = 2,
        reduce_dim: int = 256,
    ) -> None:
        super().__init__(backbone, shots, reduce_dim)
        self.meta = MetaLearner(reduce_dim)
        self.base_head = base_head if base_head is not None else PSPHead(backbone.channels[4], base_classes + 1)
        self.base_backbone = base_backbone
        self.gram_merge = _merge_conv()
        self.cls_merge = _merge_conv()
        self.kshot_rw = None
        if shots > 1:
            self.kshot_rw = nn.Sequential(
                nn.Conv2d(shots, kshot_hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(kshot_hidden, shots, 1)
            )
        for module in self.frozen_modules():
            _freeze(module)

    @classmethod
    def from_pspnet(cls, pspnet: PSPNet, shots: int = 1, **kwargs: object) -> BAM:
        """Stage 2 from a trained stage-1 PSPNet (its backbone and head are taken, not copied)."""
        return cls(pspnet.backbone, shots, base_head=pspnet.head, base_classes=pspnet.classes - 1, **kwargs)

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.base_head, self.base_backbone) if m is not None]

    def set_strategy(self, strategy: object = "frozen", **options: object) -> list[dict]:
        """Apply a strategy to the meta learner's backbone; first keep a frozen copy for the base learner if the
        strategy changes the backbone."""
        from .strategies import apply_strategy, parse_strategy

        spec = parse_strategy(strategy, options.get("layers"), options.get("conv_kind"))
        if spec.name != "frozen" and self.base_backbone is None:
            if self.backbone.strategy is not None:
                raise ValueError("the backbone already carries a strategy: pass base_backbone explicitly")
            self.base_backbone = _freeze(copy.deepcopy(self.backbone))
        return apply_strategy(self.backbone, strategy, **options)

    def _base_features(self, query: Tensor, query_stages: list[Tensor]) -> Tensor:
        """layer4 of the query as the base learner's own (frozen) backbone computes it; leading stages that the
        strategy left unchanged are shared with the meta learner's pass."""
        if self.base_backbone is None:
            return query_stages[4].detach()
        changed = self.backbone.changed_stages()
        start = changed[0] if changed else 5
        if start == 5:
            return query_stages[4].detach()
        with torch.no_grad():
            x = query if start == 0 else query_stages[start - 1].detach()
            for index in range(start, 5):
                x = self.base_backbone.stage(index, x)
        return x

    def forward(
        self,
        query: Tensor,
        support_images: Tensor,
        support_masks: Tensor,
        query_mask: Tensor | None = None,
        *,
        base_label: Tensor | None = None,
        episode_class: Tensor | None = None,
    ):
        """``base_label``: the query's base-class label map (0 background, 1..n base classes, 255 ignore) for the
        base loss. ``episode_class``: the episode class's channel in the base learner (1..n), per episode; in
        training it is left out of the base learner's foreground map, as in BAM."""
        self._check_shots(support_images)
        features = self.encode(query, support_images, support_masks)
        shots = support_images.shape[1]
        distances = torch.stack(
            [gram_distance(features.query_low, features.support_low[:, k]) for k in range(shots)], dim=1
        )
        weights = kshot_weights(distances, self.kshot_rw)  # (B, K)
        scene = (weights * distances).sum(dim=1)  # (B,)
        prior = (weights[:, :, None, None, None] * features.priors).sum(dim=1)
        prototype = (weights[:, :, None, None, None].to(features.prototypes.dtype) * features.prototypes).sum(dim=1)
        meta_logits = self.meta(features.query, prototype, prior)

        with torch.no_grad():
            base_logits = self.base_head(self._base_features(query, features.query_stages))
        meta_probabilities = meta_logits.float().softmax(dim=1)
        base_probabilities = base_logits.float().softmax(dim=1)
        exclude = episode_class if (self.training and episode_class is not None) else None
        base_map = base_foreground(base_probabilities, exclude)
        scene_map = scene[:, None, None, None].expand_as(meta_probabilities[:, :1])
        meta_bg = self.gram_merge(torch.cat([meta_probabilities[:, :1], scene_map], dim=1))
        meta_fg = self.gram_merge(torch.cat([meta_probabilities[:, 1:], scene_map], dim=1))
        final_bg = self.cls_merge(torch.cat([meta_bg, base_map], dim=1))
        logits = torch.cat([final_bg, meta_fg], dim=1)

        size = query.shape[-2:]
        logits, meta_logits, base_logits = (resize(x, size) for x in (logits, meta_logits, base_logits))
        terms = {"main": (1.0, logits, query_mask), "meta": (1.0, meta_logits, query_mask)}
        if base_label is not None:
            terms["base"] = (1.0, base_logits, base_label)
        return finish(logits, query_mask, terms, meta_logits=meta_logits, base_logits=base_logits)


def _freeze(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    svftune.freeze_batchnorm(module)  # BN in eval mode; its Dropout2d follows model.train() as in BAM
    return module


__all__ = [
    "BAM",
    "PPM",
    "PSPHead",
    "PSPNet",
    "base_foreground",
    "kshot_weights",
    "load_pspnet_weights",
]
