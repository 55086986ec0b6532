"""SVF on real ImageNet MobileNetV2 weights, classifying real photos (all offline).

Weights: torchvision's IMAGENET1K_V1 state dict shipped inside the registry package named in ``assets``; photos: the
CC0 images bundled with scikit-image. Relative errors are ``||actual - expected|| / ||expected||`` (Frobenius);
fp32 comparisons that are not bit-identical by construction use ``RTOL``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import assets
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from skimage import data as skdata
from toys import relative_error

import svftune
from svftune.layers import SVFLayer

RTOL = 1e-5
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
EGYPTIAN_CAT, ESPRESSO = 285, 967


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Single-threaded: on a loaded 2-core machine two OpenMP threads made this file 8x slower (43 s against 5.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mobilenet() -> torch.nn.Module:
    try:
        path = assets.mobilenet_v2_weights()
    except FileNotFoundError as error:
        pytest.fail(str(error))  # not a skip: CI installs the package, so a missing file is a broken setup
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """The photos with standard ImageNet preprocessing: resize 256, center crop 224, mean/std normalisation."""
    batch = []
    for name in PHOTOS:
        image = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1)
        image = TF.center_crop(TF.resize(image, [256], antialias=True), [224])
        batch.append(TF.normalize(image.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    return torch.stack(batch)


def _top5(logits: torch.Tensor) -> list[list[int]]:
    return logits.topk(5).indices.tolist()


def _eval_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_original_model_recognises_the_photos(mobilenet, photos):
    top5 = _top5(_eval_logits(mobilenet, photos))
    chelsea, coffee = top5[PHOTOS.index("chelsea")], top5[PHOTOS.index("coffee")]
    assert chelsea[0] in CAT_CLASSES and EGYPTIAN_CAT in chelsea, f"chelsea top-5 {chelsea}: wrong weights?"
    assert ESPRESSO in coffee, f"coffee top-5 {coffee}: wrong weights?"


def test_eval_logits_bit_identical_after_apply(mobilenet, photos):
    expected = _eval_logits(mobilenet, photos)
    model = svftune.apply_svf(copy.deepcopy(mobilenet))
    layers = svftune.svf_layers(model)
    assert len(layers) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in mobilenet.modules())
    logits = _eval_logits(model, photos)
    assert torch.equal(logits, expected)
    assert _top5(logits) == _top5(expected)


def test_train_mode_three_op_keeps_predictions(mobilenet, photos):
    reference = copy.deepcopy(mobilenet)
    svftune.freeze_batchnorm(reference)
    reference.train()
    model = svftune.apply_svf(copy.deepcopy(mobilenet)).train()
    three_op = []
    handles = [
        layer.register_forward_pre_hook(lambda layer, args: three_op.append(layer.uses_three_op(args[0])))
        for _, layer in svftune.svf_layers(model)
    ]
    torch.manual_seed(0)  # the classifier's dropout draws the same mask in both models
    logits = model(photos)
    torch.manual_seed(0)
    expected = reference(photos)
    for handle in handles:
        handle.remove()
    assert sum(three_op) >= len(three_op) // 2, f"only {sum(three_op)} of {len(three_op)} layers ran three-op"
    error = relative_error(logits.detach(), expected.detach())
    assert error <= RTOL, f"train-mode logits off by {error:.2e} relative"
    assert _top5(logits) == _top5(expected)
    # Dropout was active (so the shared seed mattered): the eval logits differ from the train-mode ones.
    assert not torch.allclose(expected, _eval_logits(copy.deepcopy(mobilenet), photos))


def test_merge_keeps_predictions(mobilenet, photos):
    model = svftune.apply_svf(copy.deepcopy(mobilenet))
    at_init = svftune.merge_svf(copy.deepcopy(model))
    assert torch.equal(_eval_logits(at_init, photos), _eval_logits(mobilenet, photos))

    # A lightly fine-tuned model (two SGD steps on the photos' own top-1 labels) must merge to the same predictions.
    labels = _eval_logits(mobilenet, photos).argmax(1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(photos), labels).backward()
        optimizer.step()
    assert any(not torch.equal(layer.S, layer.S0) for _, layer in svftune.svf_layers(model))
    tuned = _eval_logits(model, photos)
    assert relative_error(tuned, _eval_logits(mobilenet, photos)) > 1e-3, "fine-tuning must change the logits"
    merged = svftune.merge_svf(model)
    assert not any(isinstance(m, SVFLayer) for m in merged.modules())
    assert [type(m) for m in merged.modules()] == [type(m) for m in mobilenet.modules()]
    logits = _eval_logits(merged, photos)
    error = relative_error(logits, tuned)
    assert error <= RTOL, f"merged logits off by {error:.2e} relative"
    assert _top5(logits) == _top5(tuned)
