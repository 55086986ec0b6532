"""Label / mask nearest-neighbour resizing: OpenCV's INTER_NEAREST source indices, checked against independent
references (exact rationals, a scalar float64 transcription of OpenCV's formula, and cv2 itself when installed)."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from svf_fss.data.transforms import TestResize, TrainTransform, nearest_source_index, resize_nearest

# The sizes of the protocol: Pascal's 500 x 375 images at the 473 test size (-> 472 x 352 / 354), small objects
# scaled up to a test canvas.
PROTOCOL_PAIRS = [(500, 472), (375, 354), (375, 352), (128, 376), (144, 472), (472, 500), (354, 375), (1, 7), (7, 1)]
# Where torch's float32 nearest lands one low (issue 13): (n_in, n_out) -> {output index: exact source index}.
TORCH_OFF_BY_ONE = {(500, 472): {118: 125, 236: 250}, (128, 376): {47: 16, 94: 32, 188: 64}, (144, 472): {413: 126}}


def exact_floor(n_in: int, n_out: int) -> list[int]:
    """floor(x * n_in / n_out) with exact rationals."""
    return [math.floor(Fraction(x * n_in, n_out)) for x in range(n_out)]


def opencv_formula(n_in: int, n_out: int, scale: float | None = None) -> list[int]:
    """OpenCV's resizeNN, one scalar at a time in Python floats (IEEE float64): ``ifx = 1. / fx`` with
    ``fx = dsize / ssize`` (or the fx passed by the caller), ``min(cvFloor(x * ifx), ssize - 1)``."""
    fx = scale if scale is not None else n_out / n_in
    ifx = 1.0 / fx
    return [min(math.floor(x * ifx), n_in - 1) for x in range(n_out)]


def random_pairs(count: int = 300, seed: int = 13) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, 700), rng.randint(1, 700)) for _ in range(count)]


@pytest.mark.parametrize("n_in, n_out", PROTOCOL_PAIRS)
def test_protocol_sizes_take_the_exact_floor(n_in, n_out):
    expected = exact_floor(n_in, n_out)
    assert nearest_source_index(n_in, n_out).tolist() == expected
    assert nearest_source_index(n_in, n_out, rule="floor").tolist() == expected
    assert opencv_formula(n_in, n_out) == expected  # OpenCV agrees with the exact floor on these sizes


@pytest.mark.parametrize("pair, lines", list(TORCH_OFF_BY_ONE.items()))
def test_torch_nearest_is_one_low_where_we_are_exact(pair, lines):
    n_in, n_out = pair
    ours = nearest_source_index(n_in, n_out)
    torch_index = F.interpolate(torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in), size=n_out, mode="nearest")
    torch_index = torch_index.view(-1).long()
    wrong = (torch_index != ours).nonzero().view(-1).tolist()
    assert wrong == sorted(lines)
    for x, source in lines.items():
        assert ours[x] == source and torch_index[x] == source - 1


def test_random_sizes_match_opencv_s_formula_and_the_floor_rule_matches_rationals():
    disagreements = 0
    for n_in, n_out in random_pairs():
        opencv = nearest_source_index(n_in, n_out).tolist()
        assert opencv == opencv_formula(n_in, n_out), (n_in, n_out)
        floor = nearest_source_index(n_in, n_out, rule="floor").tolist()
        assert floor == exact_floor(n_in, n_out), (n_in, n_out)
        disagreements += opencv != floor
    # OpenCV's rounded reciprocal differs from the exact floor on a few per cent of size pairs (one line each)
    assert 0 < disagreements < 60


def test_a_pair_where_opencv_is_not_the_exact_floor():
    # 2 -> 98: fx = 49.0, ifx = 1/49 rounds down, 49 * ifx = 0.9999999999999999, floor 0 (the exact value is 1)
    assert nearest_source_index(2, 98)[49] == 0
    assert nearest_source_index(2, 98, rule="floor")[49] == 1


@pytest.mark.parametrize("scale", [0.9, 0.95371, 1.0, 1.07, 1.1, 0.8, 1.25])
def test_scale_factor_form_matches_opencv_s_fx_call(scale):
    for n_in in (375, 500, 333, 641):
        n_out = round(n_in * scale)
        assert nearest_source_index(n_in, n_out, scale=scale).tolist() == opencv_formula(n_in, n_out, scale)


def test_resize_nearest_maps_rows_and_columns_and_keeps_values():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 256, (2, 375, 500), generator=generator, dtype=torch.uint8)
    out = resize_nearest(maps, 354, 472)
    rows, cols = exact_floor(375, 354), exact_floor(500, 472)
    expected = maps.numpy()[:, rows][:, :, cols]
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), expected)


def test_bad_sizes_and_rules_are_refused():
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        nearest_source_index(0, 5)
    with pytest.raises(ValueError, match="unknown nearest rule"):
        nearest_source_index(5, 5, rule="round")
    with pytest.raises(ValueError, match="drop scale"):
        nearest_source_index(5, 6, scale=1.2, rule="floor")


def test_test_resize_labels_use_the_exact_indices():
    """A Pascal-size label through the test resize: the canvas holds exactly the OpenCV-nearest samples."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 21, (375, 500), dtype=np.uint8)
    image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    _, (canvas,) = TestResize(473)(image, [label])
    nh, nw = 352, 472
    expected = label[exact_floor(375, nh)][:, exact_floor(500, nw)]
    assert np.array_equal(canvas[:nh, :nw].numpy(), expected)
    assert (canvas[nh:] == 255).all() and (canvas[:, nw:] == 255).all()


def test_train_scale_labels_follow_the_scale_factor():
    """RandScale alone (no rotation, blur, flip; crop = the scaled size): labels are sampled at floor(x / s)."""
    rng_image = np.random.default_rng(1)
    label = rng_image.integers(0, 21, (150, 210), dtype=np.uint8)
    image = rng_image.integers(0, 256, (150, 210, 3), dtype=np.uint8)
    transform = TrainTransform(size=1, scale=(0.9, 1.1), rotate_p=0.0, blur_p=0.0, flip_p=0.0)
    scale = np.random.default_rng(7).uniform(0.9, 1.1)
    h, w = round(150 * scale), round(210 * scale)
    transform.size = min(h, w)
    _, (out,) = transform(image, [label], np.random.default_rng(7))
    full = label[opencv_formula(150, h, scale)][:, opencv_formula(210, w, scale)]
    # the crop is a window of the scaled label: find it by its position in the full scaled map
    found = any(
        np.array_equal(out.numpy(), full[y : y + out.shape[0], x : x + out.shape[1]])
        for y in range(h - out.shape[0] + 1)
        for x in range(w - out.shape[1] + 1)
    )
    assert found


def test_equal_to_cv2_when_installed():
    cv2 = pytest.importorskip("cv2")
    for n_in, n_out in PROTOCOL_PAIRS + random_pairs(100, seed=5):
        source = np.arange(n_in, dtype=np.float32)[None, :].repeat(2, axis=0)
        got = cv2.resize(source, (n_out, 2), interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)
        assert got.tolist() == nearest_source_index(n_in, n_out).tolist(), (n_in, n_out)
    for scale in (0.9, 1.07, 1.25):
        source = np.arange(500, dtype=np.float32)[None, :].repeat(2, axis=0)
        got = cv2.resize(source, None, fx=scale, fy=1.0, interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)
        assert got.tolist() == nearest_source_index(500, got.shape[0], scale=scale).tolist()
