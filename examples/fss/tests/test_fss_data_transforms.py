"""Training chain and test-time resize: exact identities, padding/void rules, rotation, blur, fg-aware crop."""

import numpy as np
import pytest
import torch
from svf_fss.data import IMAGENET_MEAN, IMAGENET_STD, TestResize, TrainTransform, to_original_size
from svf_fss.data.transforms import fg_crop_offsets, gaussian_blur, gaussian_kernel, normalize, rotate

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def sample(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), dtype=np.uint8)
    label[10:30, 20:50] = 1
    label[35:40, :] = 255
    base = np.where(label == 1, 3, 0).astype(np.uint8)
    return image, label, base


def identity_chain(size):
    return TrainTransform(size, scale=(1.0, 1.0), rotate_p=0.0, blur_p=0.0, flip_p=0.0)


def test_identity_settings_only_normalise():
    image, label, base = sample(50, 50)
    img, (lbl, b) = identity_chain(50)(image, [label, base], np.random.default_rng(0))
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - MEAN) / STD
    assert img.dtype == torch.float32 and img.shape == (3, 50, 50)
    torch.testing.assert_close(img, expected, atol=1e-5, rtol=0)
    assert torch.equal(lbl, torch.from_numpy(label).long()) and torch.equal(b, torch.from_numpy(base).long())


def test_padding_centres_the_image_with_mean_and_void():
    image, label, _ = sample(20, 30)
    img, (lbl,) = identity_chain(40)(image, [label], np.random.default_rng(0))
    top, left = (40 - 20) // 2, (40 - 30) // 2
    assert torch.equal(lbl[top : top + 20, left : left + 30], torch.from_numpy(label).long())
    assert (lbl[:top] == 255).all() and (lbl[top + 20 :] == 255).all() and (lbl[:, :left] == 255).all()
    assert img[:, :top].abs().max() < 1e-5  # the ImageNet mean normalises to 0


def test_flip_mirrors_image_and_labels():
    image, label, _ = sample(32, 32)
    t = TrainTransform(32, scale=(1.0, 1.0), rotate_p=0.0, blur_p=0.0, flip_p=1.0)
    img, (lbl,) = t(image, [label], np.random.default_rng(0))
    plain, (plain_lbl,) = identity_chain(32)(image, [label], np.random.default_rng(0))
    assert torch.equal(img, plain.flip(-1)) and torch.equal(lbl, plain_lbl.flip(-1))


def test_rotate_by_90_degrees_matches_rot90_and_fills_void():
    image, label, _ = sample(40, 40)
    img = torch.from_numpy(image).permute(2, 0, 1).float()
    lbl = torch.from_numpy(label)[None]
    r_img, r_lbl = rotate(img, lbl, 90.0, MEAN * 255)
    torch.testing.assert_close(r_img, torch.rot90(img, 1, (1, 2)), atol=1e-3, rtol=0)  # counter-clockwise
    assert torch.equal(r_lbl, torch.rot90(lbl, 1, (1, 2)))
    _, small = rotate(img, torch.zeros_like(lbl), 10.0, MEAN * 255)
    assert small[0, 0, 0] == 255 and small[0, 20, 20] == 0  # corners rotate in as void, the centre stays


def test_gaussian_blur_kernel_and_borders():
    k = gaussian_kernel(5)
    sigma = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a 5-tap kernel
    x = torch.arange(5.0) - 2
    torch.testing.assert_close(k, torch.exp(-(x**2) / (2 * sigma**2)) / torch.exp(-(x**2) / (2 * sigma**2)).sum())
    delta = torch.zeros(3, 9, 9)
    delta[:, 4, 4] = 1.0
    torch.testing.assert_close(gaussian_blur(delta)[0, 2:7, 2:7], torch.outer(k, k))
    flat = torch.full((3, 6, 7), 77.0)
    torch.testing.assert_close(gaussian_blur(flat), flat)


def test_fg_aware_crop_keeps_85_percent_when_possible():
    fg = torch.zeros(200, 200, dtype=torch.bool)
    fg[60:80, 60:80] = True  # 400 px: a random 100-px crop keeps >= 85% of it with p ~= 0.4
    kept = []
    for seed in range(50):
        y, x = fg_crop_offsets(fg, 100, np.random.default_rng(seed))
        kept.append(fg[y : y + 100, x : x + 100].sum().item() / 400)
    assert min(kept) >= 0.85  # 31 draws: failure probability 0.6**31
    no_retry = [fg_crop_offsets(fg, 100, np.random.default_rng(s), retries=0) for s in range(50)]
    assert np.mean([fg[y : y + 100, x : x + 100].sum().item() / 400 >= 0.85 for y, x in no_retry]) < 0.7
    everywhere = torch.ones(200, 200, dtype=torch.bool)  # impossible: the last draw is kept
    y, x = fg_crop_offsets(everywhere, 100, np.random.default_rng(0))
    assert 0 <= y <= 100 and 0 <= x <= 100


def test_train_chain_shapes_values_and_determinism():
    image, label, base = sample(375, 500)
    t = TrainTransform(473)
    a_img, a_maps = t(image, [label, base], np.random.default_rng(3))
    b_img, b_maps = t(image, [label, base], np.random.default_rng(3))
    assert a_img.shape == (3, 473, 473) and all(m.shape == (473, 473) and m.dtype == torch.int64 for m in a_maps)
    assert torch.equal(a_img, b_img) and all(torch.equal(x, y) for x, y in zip(a_maps, b_maps, strict=True))
    assert set(a_maps[0].unique().tolist()) <= {0, 1, 255} and set(a_maps[1].unique().tolist()) <= {0, 3, 255}
    assert (a_maps[1][a_maps[0] == 1] == 3).all()  # maps are warped together
    c_img, _ = t(image, [label, base], np.random.default_rng(4))
    assert not torch.equal(a_img, c_img)


@pytest.mark.parametrize(
    ("h", "w", "multiple", "nh", "nw"),
    [(375, 500, 8, 352, 472), (500, 333, 8, 472, 312), (100, 100, 8, 472, 472), (375, 500, 1, 354, 473)],
)
def test_test_resize_longer_side_top_left_canvas(h, w, multiple, nh, nw):
    # public test code: longer side 473, shorter floor(side * 473 / longer), both floored to a multiple of 8
    image, label, _ = sample(h, w)
    img, (lbl,) = TestResize(473, multiple_of=multiple)(image, [label])
    assert img.shape == (3, 473, 473) and lbl.shape == (473, 473)
    assert (lbl[nh:] == 255).all() and (lbl[:, nw:] == 255).all()
    assert (lbl[nh - 1, :nw] != 255).any() and (lbl[:nh, nw - 1] != 255).any()  # the image reaches (nh, nw)
    pad = ((0 - MEAN) / STD).expand(3, 473, 473)  # raw 0 on the canvas
    outside = torch.ones(473, 473, dtype=torch.bool)
    outside[:nh, :nw] = False
    torch.testing.assert_close(img[:, outside], pad[:, outside], atol=1e-5, rtol=0)


def test_to_original_size_inverts_the_test_resize():
    image, label, _ = sample(300, 420)
    label = np.where(label == 255, 0, label).astype(np.uint8)
    _, (canvas,) = TestResize(473)(image, [label])
    logits = torch.stack([(canvas == 0).float(), (canvas == 1).float()])[None]  # (1, 2, S, S)
    back = to_original_size(logits, (300, 420))
    assert back.shape == (1, 2, 300, 420)
    agree = (back.argmax(1)[0] == torch.from_numpy(label).long()).float().mean()
    assert agree > 0.995


def test_normalize_matches_definition():
    x = torch.full((3, 2, 2), 255.0)
    torch.testing.assert_close(normalize(x), ((1 - MEAN) / STD).expand(3, 2, 2))
    with pytest.raises(ValueError, match="differs from image shape"):
        TestResize(8)(np.zeros((4, 4, 3), np.uint8), [np.zeros((4, 5), np.uint8)])
