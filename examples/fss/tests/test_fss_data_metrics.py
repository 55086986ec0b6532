"""mIoU / FB-IoU on hand-computed cases: accumulation over episodes (not averaging), void, missing classes."""

import numpy as np
import pytest
import torch
from svf_fss.data import FSSMeter, episode_counts, mean_over_folds

pytestmark = pytest.mark.usefixtures("single_thread")

# target: 1 = fg, 0 = bg, 255 = void; pred: 1 = fg
TARGET = np.array([[1, 1, 0], [0, 255, 1]], dtype=np.uint8)
PRED = np.array([[1, 0, 0], [1, 1, 1]], dtype=np.uint8)


def test_episode_counts_by_hand():
    # valid pixels: all but (1,1). fg target {(0,0),(0,1),(1,2)}, fg pred {(0,0),(1,0),(1,2)} -> I 2, U 4.
    # bg target {(0,2),(1,0)}, bg pred {(0,1),(0,2)} -> I 1, U 3. The void pixel (predicted fg) is ignored.
    assert episode_counts(PRED, TARGET) == (1, 3, 2, 4)
    assert episode_counts(torch.from_numpy(PRED).bool(), torch.from_numpy(TARGET).long()) == (1, 3, 2, 4)


def test_class_iou_sums_intersection_and_union_over_episodes():
    m = FSSMeter([1, 2])
    m.update(PRED, TARGET, 1)  # I 2, U 4
    empty_pred = np.zeros((2, 5), np.uint8)
    big_target = np.ones((2, 5), np.uint8)
    m.update(empty_pred, big_target, 1)  # I 0, U 10
    assert m.class_iou()[1] == pytest.approx(2 / 14)  # not mean(2/4, 0/10) = 0.25
    assert m.class_iou()[2] == 0.0  # no episode: counts 0 in the mean
    assert m.miou() == pytest.approx((2 / 14 + 0) / 2)
    # FB: bg I 1+0, U 3+10; fg I 2+0, U 4+10
    assert m.fb_iou() == pytest.approx(0.5 * (1 / 13 + 2 / 14))
    assert m.summary()["episodes"] == {1: 2, 2: 0}


def test_perfect_and_all_background_predictions():
    m = FSSMeter([3, 4])
    m.update(TARGET == 1, TARGET, 3)
    m.update(np.array([[0, 1]]), np.array([[0, 1]]), 4)
    assert m.miou() == 1.0 and m.fb_iou() == 1.0
    z = FSSMeter([3])
    z.update(np.zeros_like(TARGET), TARGET, 3)
    # fg IoU 0; bg: target bg 2 px, pred bg 5 valid px, I 2 -> 2/5
    assert z.miou() == 0.0 and z.fb_iou() == pytest.approx(0.5 * 2 / 5)


def test_fully_void_episode_adds_nothing():
    m = FSSMeter([1])
    m.update(np.ones((3, 3)), np.full((3, 3), 255), 1)
    assert m.inter[1] == 0 and m.union[1] == 0 and m.miou() == 0.0 and m.episodes[1] == 1


def test_counts_are_exact_integers_and_errors():
    m = FSSMeter([1])
    big = torch.ones(1000, 1000, dtype=torch.uint8)
    for _ in range(3):
        m.update(big, big, 1)
    assert m.inter[1] == 3_000_000 and isinstance(m.inter[1], int)
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros((2, 2)), np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="not one of"):
        m.update(PRED, TARGET, 7)


def test_mean_over_folds():
    assert mean_over_folds([60.0, 70.0, 65.0, 62.0]) == pytest.approx(64.25)
