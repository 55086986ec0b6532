"""The interface every few-shot method shares.

``model(query, support_images, support_masks)`` returns logits ``(B, 2, H, W)`` at the query's resolution.
Given the query mask, ``model(query, support_images, support_masks, query_mask)`` returns a dict::

    {"logits": (B, 2, H, W), "loss": scalar to backpropagate, "losses": {name: scalar, ...}}

(BAM adds ``"meta_logits"`` and ``"base_logits"`` and takes ``base_label`` / ``episode_class``; the other
methods accept and ignore them, so a trainer can call every method the same way.)

Shapes: query ``(B, 3, H, W)``; support images ``(B, K, 3, H, W)``; support masks ``(B, K, H, W)`` with 1 =
foreground, 0 = background, 255 = ignore (only ``== 1`` counts as foreground); query mask ``(B, H, W)`` the same way.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from .backbones import Backbone
from .common import EpisodeFeatures, down_projection, encode_episode, segmentation_loss


class FewShotSegmenter(nn.Module):
    """Backbone + ``down_query`` / ``down_supp`` projections of the mid-level feature ``cat(layer3, layer2)``."""

    method: ClassVar[str] = ""

    def __init__(self, backbone: Backbone, shots: int = 1, reduce_dim: int = 256) -> None:
        super().__init__()
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        self.backbone = backbone
        self.shots = shots
        self.reduce_dim = reduce_dim
        self.down_query = down_projection(backbone.mid_channels, reduce_dim)
        self.down_supp = down_projection(backbone.mid_channels, reduce_dim)

    # ------------------------------------------------------------------------------------------ strategy
    def set_strategy(self, strategy: object = "frozen", **options: object) -> list[dict]:
        """Apply a backbone fine-tuning strategy (see :func:`svf_fss.models.strategies.apply_strategy`)."""
        from .strategies import apply_strategy

        return apply_strategy(self.backbone, strategy, **options)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that never train (besides the backbone's frozen parts): BAM's base learner."""
        return []

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the backbone."""
        skip = {id(p) for p in self.backbone.parameters()}
        for module in self.frozen_modules():
            skip.update(id(p) for p in module.parameters())
        return [p for p in self.parameters() if p.requires_grad and id(p) not in skip]

    def param_groups(self) -> list[dict]:
        """Optimizer groups: ``{"name", "params", "lr_scale"}``; the trainer sets ``lr = base_lr * lr_scale``.

        ``head`` (lr_scale 1) plus the backbone groups of the strategy: ``singular_values`` and ``backbone``
        (lr_scale 0.1, the paper's lr/10), ``adapters`` (lr_scale 1, new layers).
        """
        from .strategies import backbone_param_groups

        head = {"name": "head", "params": self.head_parameters(), "lr_scale": 1.0}
        return [head, *backbone_param_groups(self.backbone)]

    # ------------------------------------------------------------------------------------------ helpers
    def encode(self, query: Tensor, support_images: Tensor, support_masks: Tensor) -> EpisodeFeatures:
        if self.backbone.strategy is None:
            raise RuntimeError(
                "the backbone has no fine-tuning strategy yet, so its BatchNorm is not frozen: call "
                "model.set_strategy('frozen') (or 'svf', ...), or build the model with build_model()"
            )
        return encode_episode(self.backbone, self.down_query, self.down_supp, query, support_images, support_masks)

    def _check_shots(self, support_images: Tensor) -> None:
        if support_images.dim() == 5 and support_images.shape[1] != self.shots and self.fixed_shots:
            raise ValueError(
                f"this {type(self).__name__} was built for {self.shots} shot(s), got {support_images.shape[1]}"
            )

    #: whether the method's parameters depend on K (BAM's K-shot weighting does).
    fixed_shots: ClassVar[bool] = False


def finish(logits: Tensor, query_mask: Tensor | None, terms: dict[str, tuple[float, Tensor, Tensor]], **extra: Tensor):
    """Shared return convention. ``logits`` are already at query resolution; ``terms`` maps a loss name to
    ``(weight, logits, target)``; the total loss is the weighted sum. Without a query mask: the logits alone."""
    if query_mask is None:
        return logits
    losses = {name: segmentation_loss(out, target) for name, (_, out, target) in terms.items()}
    total = sum(terms[name][0] * value for name, value in losses.items())
    return {"logits": logits, "loss": total, "losses": losses, **extra}
