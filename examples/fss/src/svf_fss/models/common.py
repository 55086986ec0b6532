"""Building blocks shared by the methods: masked average pooling, the prior mask, the Gram distance, ASPP,
the mid-level feature projection and the episode encoder.

Numerically sensitive reductions (cosine similarities with ``eps = 1e-7``, min-max normalisation, Gram matrices)
run in float32 even under ``torch.autocast``: in bfloat16 they would lose the small differences they measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone

COSINE_EPS = 1e-7
MAP_EPS = 5e-4  # masked average pooling: sum(f * m) / (sum(m) + 5e-4)
IGNORE_INDEX = 255


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with ``align_corners=True`` (what PFENet and BAM use everywhere); no-op at equal size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def masked_average_pooling(features: Tensor, mask: Tensor) -> Tensor:
    """Prototype ``sum(f * m) / (sum(m) + 5e-4)`` over space: ``(N, C, h, w), (N, 1, h, w) -> (N, C, 1, 1)``."""
    mask = mask.to(features.dtype)
    total = (features * mask).sum(dim=(2, 3), keepdim=True)
    return total / (mask.sum(dim=(2, 3), keepdim=True) + MAP_EPS)


def prior_mask(query: Tensor, support: Tensor, support_mask: Tensor) -> Tensor:
    """PFENet's training-free prior for one shot.

    Args:
        query: layer4 features of the query, ``(B, C, h, w)``.
        support: layer4 features of the support (computed on masked layer3 features), ``(B, C, h', w')``.
        support_mask: foreground mask at the support feature size, ``(B, 1, h', w')``.

    Returns:
        ``(B, 1, h, w)``: for every query pixel the highest cosine similarity to a masked support pixel,
        ``s.q / (|s| |q| + 1e-7)``, min-max normalised per image.
    """
    with torch.autocast(query.device.type, enabled=False):
        return _prior_mask(query, support, support_mask)


def _prior_mask(query: Tensor, support: Tensor, support_mask: Tensor) -> Tensor:
    batch, channels, height, width = query.shape
    q = query.float().reshape(batch, channels, -1)
    s = (support.float() * support_mask.float()).reshape(batch, channels, -1).transpose(1, 2)
    similarity = torch.bmm(s, q) / (torch.bmm(s.norm(dim=2, keepdim=True), q.norm(dim=1, keepdim=True)) + COSINE_EPS)
    similarity = similarity.max(dim=1).values  # (B, h*w): best support pixel per query pixel
    low = similarity.min(dim=1, keepdim=True).values
    high = similarity.max(dim=1, keepdim=True).values
    similarity = (similarity - low) / (high - low + COSINE_EPS)
    return similarity.reshape(batch, 1, height, width)


def gram_matrix(features: Tensor) -> Tensor:
    """Channel cosine-similarity matrix ``(B, C, h, w) -> (B, C, C)`` (BAM's ``get_gram_matrix``, eps 1e-7)."""
    with torch.autocast(features.device.type, enabled=False):
        f = features.float().flatten(2)
        norm = f.norm(dim=2, keepdim=True)
        return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + COSINE_EPS)


def gram_distance(query: Tensor, support: Tensor) -> Tensor:
    """BAM's scene difference ``psi = ||G(q) - G(s)||_F / C`` for matching batches: ``(B, C, h, w) x2 -> (B,)``."""
    difference = gram_matrix(query) - gram_matrix(support)
    return difference.norm(dim=(1, 2)) / query.shape[1]  # ||ones(C, C)||_F = C


def conv_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1, bias: bool = False) -> nn.Sequential:
    """Conv (``padding = dilation * (kernel // 2)``) + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=bias),
        nn.ReLU(inplace=True),
    )


def down_projection(cin: int, dim: int = 256) -> nn.Sequential:
    """``down_query`` / ``down_supp``: 1x1 conv (no bias) -> ReLU -> Dropout2d(0.5)."""
    return nn.Sequential(nn.Conv2d(cin, dim, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=0.5))


def classifier(dim: int = 256, classes: int = 2) -> nn.Sequential:
    """3x3 conv (no bias) -> ReLU -> Dropout2d(0.1) -> 1x1 conv (with bias) to ``classes``."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=0.1),
        nn.Conv2d(dim, classes, 1),
    )


class ASPP(nn.Module):
    """ASPP without BatchNorm (BAM's meta learner): image pooling + 1x1, 1x1, 3x3 with dilations 6, 12, 18;
    each conv with bias and ReLU; outputs the concatenation (5 x ``dim`` channels)."""

    def __init__(self, dim: int = 256, dilations: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        self.pool = conv_relu(dim, dim, 1, bias=True)
        self.branches = nn.ModuleList(
            [conv_relu(dim, dim, 1, bias=True)] + [conv_relu(dim, dim, 3, d, bias=True) for d in dilations]
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1)


@dataclass
class EpisodeFeatures:
    """What the shared encoder extracts from one batch of episodes (B episodes, K shots each)."""

    query: Tensor  # (B, 256, h, w) mid-level query feature after down_query
    prototypes: Tensor  # (B, K, 256, 1, 1) masked average pooling of the support mid features
    priors: Tensor  # (B, K, 1, h, w) prior masks at mid-feature size
    query_low: Tensor  # (B, C2, h, w) layer2 of the query, at mid-feature size (BAM's Gram matrices)
    support_low: Tensor  # (B, K, C2, h, w) layer2 of the supports, at mid-feature size
    query_stages: list[Tensor]  # layer0..layer4 outputs for the query (BAM's base learner reuses them)


def support_foreground(masks: Tensor) -> Tensor:
    """Binary foreground ``(mask == 1)`` as float, ``(B, K, H, W) -> (B*K, 1, H, W)``."""
    return (masks == 1).flatten(0, 1).unsqueeze(1).float()


def encode_episode(
    backbone: Backbone,
    down_query: nn.Module,
    down_supp: nn.Module,
    query: Tensor,
    support_images: Tensor,
    support_masks: Tensor,
) -> EpisodeFeatures:
    """Run the backbone on query and supports, build mid features, prototypes and prior masks.

    Query and supports go through layer0..layer3 in one batch (BatchNorm is frozen, so batching changes nothing);
    layer4 runs on the query's layer3 and on the supports' masked layer3 (PFENet's prior needs support layer4
    features of the foreground only), again in one batch.
    """
    batch, shots = support_images.shape[:2]
    if query.dim() != 4 or support_images.dim() != 5 or support_masks.dim() != 4:
        raise ValueError(
            "expected query (B, 3, H, W), support images (B, K, 3, H, W) and support masks (B, K, H, W); got "
            f"{tuple(query.shape)}, {tuple(support_images.shape)}, {tuple(support_masks.shape)}"
        )
    if support_masks.shape[:2] != (batch, shots) or query.shape[0] != batch:
        raise ValueError("query, support images and support masks disagree on batch size or shots")
    supports = support_images.flatten(0, 1)
    if supports.shape[-2:] == query.shape[-2:]:
        stages = _run_stages(backbone, torch.cat([query, supports]))
        query_stages = [s[:batch] for s in stages]
        support_stages = [s[batch:] for s in stages]
    else:
        query_stages = _run_stages(backbone, query)
        support_stages = _run_stages(backbone, supports)

    foreground = support_foreground(support_masks)
    mask3 = resize(foreground, support_stages[3].shape[-2:])
    query4_input, support4_input = query_stages[3], support_stages[3] * mask3.to(support_stages[3].dtype)
    if query4_input.shape[-2:] == support4_input.shape[-2:]:
        layer4 = backbone.stage(4, torch.cat([query4_input, support4_input]))
        query4, support4 = layer4[:batch], layer4[batch:]
    else:
        query4, support4 = backbone.stage(4, query4_input), backbone.stage(4, support4_input)
    query_stages.append(query4)

    mid_size = tuple(query_stages[3].shape[-2:])
    query_low = resize(query_stages[2], mid_size)
    support_low = resize(support_stages[2], support_stages[3].shape[-2:])
    query_mid = down_query(torch.cat([query_stages[3], query_low], dim=1))
    support_mid = down_supp(torch.cat([support_stages[3], support_low], dim=1))
    prototypes = masked_average_pooling(support_mid, mask3)

    mask4 = resize(foreground, support4.shape[-2:]).unflatten(0, (batch, shots))
    support4 = support4.unflatten(0, (batch, shots))
    # one shot at a time: a query copy per shot would be saved for the backward K times
    priors = torch.stack([prior_mask(query4, support4[:, k], mask4[:, k]) for k in range(shots)], dim=1)
    priors = resize(priors.flatten(0, 1), mid_size).unflatten(0, (batch, shots))

    support_low = resize(support_low, mid_size)
    return EpisodeFeatures(
        query=query_mid,
        prototypes=prototypes.unflatten(0, (batch, shots)),
        priors=priors,
        query_low=query_low,
        support_low=support_low.unflatten(0, (batch, shots)),
        query_stages=query_stages,
    )


def _run_stages(backbone: Backbone, x: Tensor) -> list[Tensor]:
    outputs = []
    for index in range(4):
        x = backbone.stage(index, x)
        outputs.append(x)
    return outputs


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy with 255 ignored; ``logits`` at the target's resolution. Computed in float32."""
    return F.cross_entropy(logits.float(), target.long(), ignore_index=IGNORE_INDEX)
