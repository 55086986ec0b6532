"""PFENet (Tian et al., TPAMI 2020): prior mask + prototype + Feature Enrichment Module (FEM)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone
from .base import FewShotSegmenter, finish
from .common import classifier, conv_relu, resize

PASCAL_BINS = (60, 30, 15, 8)  # absolute sizes (at 473 px the query feature is 60x60)
COCO_BINS = (1.0, 0.5, 0.25, 0.125)  # relative to the query feature size


def bin_size(bin_spec: float, size: tuple[int, int]) -> tuple[int, int]:
    """A bin > 1 is an absolute square size; a bin <= 1 is a fraction of the feature's height and width."""
    if bin_spec > 1:
        return int(bin_spec), int(bin_spec)
    return max(1, int(size[0] * bin_spec)), max(1, int(size[1] * bin_spec))


class FEM(nn.Module):
    """Feature Enrichment Module: for every bin, average-pool the query to the bin size, merge it with the tiled
    prototype and the resized prior (1x1 -> 256); from the second bin on, mix in the previous bin's result
    (``alpha`` 1x1 on the concatenation, residual); two 3x3 convs with a residual; an auxiliary classifier.
    The bins' outputs, resized to the query size, are concatenated, reduced (1x1), refined (two 3x3, residual)
    and classified."""

    def __init__(self, bins: Sequence[float] = PASCAL_BINS, dim: int = 256, classes: int = 2) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.merge = nn.ModuleList([conv_relu(2 * dim + 1, dim) for _ in self.bins])
        self.alpha = nn.ModuleList([conv_relu(2 * dim, dim) for _ in self.bins[1:]])
        self.beta = nn.ModuleList([nn.Sequential(conv_relu(dim, dim, 3), conv_relu(dim, dim, 3)) for _ in self.bins])
        self.inner_cls = nn.ModuleList([classifier(dim, classes) for _ in self.bins])
        self.reduce = conv_relu(dim * len(self.bins), dim)
        self.refine = nn.Sequential(conv_relu(dim, dim, 3), conv_relu(dim, dim, 3))
        self.cls = classifier(dim, classes)

    def forward(self, query: Tensor, prototype: Tensor, prior: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Returns the final logits at query-feature size and the auxiliary logits of every bin (at bin size)."""
        size = tuple(query.shape[-2:])
        prior = prior.to(query.dtype)
        pyramid: list[Tensor] = []
        auxiliary: list[Tensor] = []
        for index, spec in enumerate(self.bins):
            bins = bin_size(spec, size)
            x = torch.cat(
                [F.adaptive_avg_pool2d(query, bins), prototype.expand(-1, -1, *bins), resize(prior, bins)], dim=1
            )
            x = self.merge[index](x)
            if index > 0:
                previous = resize(pyramid[-1], bins)
                x = self.alpha[index - 1](torch.cat([x, previous], dim=1)) + x
            x = self.beta[index](x) + x
            auxiliary.append(self.inner_cls[index](x))
            pyramid.append(resize(x, size))
        x = self.reduce(torch.cat(pyramid, dim=1))
        x = self.refine(x) + x
        return self.cls(x), auxiliary


class PFENet(FewShotSegmenter):
    """PFENet; loss = main CE + ``aux_weight`` (1.0) x mean of the bins' auxiliary CEs.

    ``bins``: :data:`PASCAL_BINS` (absolute, default) or :data:`COCO_BINS` (relative).
    """

    method = "pfenet"

    def __init__(
        self,
        backbone: Backbone,
        shots: int = 1,
        bins: Sequence[float] = PASCAL_BINS,
        aux_weight: float = 1.0,
        reduce_dim: int = 256,
    ) -> None:
        super().__init__(backbone, shots, reduce_dim)
        self.fem = FEM(bins, reduce_dim)
        self.aux_weight = aux_weight

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
        logits, auxiliary = self.fem(features.query, features.prototypes.mean(dim=1), features.priors.mean(dim=1))
        size = query.shape[-2:]
        logits = resize(logits, size)
        terms = {"main": (1.0, logits, query_mask)}
        if query_mask is not None:
            weight = self.aux_weight / len(auxiliary)
            for index, aux in enumerate(auxiliary):
                terms[f"aux{index}"] = (weight, resize(aux, size), query_mask)
        return finish(logits, query_mask, terms)
