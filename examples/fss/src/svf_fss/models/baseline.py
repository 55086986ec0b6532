"""SVF's "baseline": PFENet with ASPP in place of FEM and the main loss only (= BAM's meta learner alone)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbones import Backbone
from .base import FewShotSegmenter, finish
from .common import ASPP, classifier, conv_relu, resize


class MetaLearner(nn.Module):
    """1x1 merge of ``cat(query 256, tiled prototype 256, prior 1)`` -> 256 + ReLU; ASPP (no BN, 1280 ch);
    1x1 -> 256 + ReLU; two 3x3 convs + ReLU with a residual; classifier (3x3 + ReLU + Dropout2d(0.1) + 1x1 -> 2)."""

    def __init__(self, dim: int = 256, classes: int = 2) -> None:
        super().__init__()
        self.merge = conv_relu(2 * dim + 1, dim)
        self.aspp = ASPP(dim)
        self.reduce = conv_relu(5 * dim, dim)
        self.refine = nn.Sequential(conv_relu(dim, dim, 3), conv_relu(dim, dim, 3))
        self.cls = classifier(dim, classes)

    def forward(self, query: Tensor, prototype: Tensor, prior: Tensor) -> Tensor:
        """``(B, 256, h, w), (B, 256, 1, 1), (B, 1, h, w) -> (B, classes, h, w)``."""
        x = torch.cat([query, prototype.expand_as(query), prior.to(query.dtype)], dim=1)
        x = self.reduce(self.aspp(self.merge(x)))
        x = self.refine(x) + x
        return self.cls(x)


#: How the baseline combines the K shots' prototypes and priors: ``"mean"`` (ours, the default) or ``"sum"``
#: (the SVF release's ``model/aspp.py``: all-ones shot weights, then ``.sum`` over shots; K times the mean).
KSHOT_RULES = ("mean", "sum")


def check_kshot(rule: str) -> str:
    """Return ``rule`` if it is one of :data:`KSHOT_RULES`, else raise ``ValueError``."""
    if rule not in KSHOT_RULES:
        raise ValueError(
            f"unknown K-shot rule {rule!r}: choose 'mean' (average the shots' prototypes and priors) or 'sum' "
            "(add them, as the SVF release's baseline does)"
        )
    return rule


class Baseline(FewShotSegmenter):
    """Prototype + prior mask + :class:`MetaLearner`; loss = cross-entropy of its output.

    K shots (``kshot``): ``"mean"`` averages prototypes and priors (default); ``"sum"`` adds them like the released
    SVF baseline, whose 5-shot prototype and prior are then 5 times the mean. Both are the same at 1 shot.
    """

    method = "baseline"

    def __init__(self, backbone: Backbone, shots: int = 1, reduce_dim: int = 256, kshot: str = "mean") -> None:
        super().__init__(backbone, shots, reduce_dim)
        self.kshot = check_kshot(kshot)
        self.meta = MetaLearner(reduce_dim)

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
        features = self.encode(query, support_images, support_masks)
        combine = torch.sum if self.kshot == "sum" else torch.mean
        logits = self.meta(features.query, combine(features.prototypes, dim=1), combine(features.priors, dim=1))
        logits = resize(logits, query.shape[-2:])
        return finish(logits, query_mask, {"main": (1.0, logits, query_mask)})
