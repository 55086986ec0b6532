"""FSS metrics: mIoU (per-class intersection/union accumulated over episodes) and FB-IoU, ignoring 255.

Feed predictions and labels at the ORIGINAL image resolution (see ``transforms.to_original_size``).
Counts are accumulated as Python ints (exact); ratios are computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .folds import IGNORE_INDEX


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def episode_counts(pred, target, ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int, int]:
    """(I_bg, U_bg, I_fg, U_fg) of one binary prediction against a 0/1/255 target of the same (H, W) shape.

    ``pred``: foreground where nonzero (0/1 labels or bool). Target pixels equal to ``ignore_index`` are skipped.
    """
    pred, target = _as_tensor(pred), _as_tensor(target).to(pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    valid = target != ignore_index
    p_fg = (pred != 0) & valid
    t_fg = (target == 1) & valid
    p_bg = (pred == 0) & valid
    t_bg = (target == 0) & valid
    out = torch.stack([(p_bg & t_bg).sum(), (p_bg | t_bg).sum(), (p_fg & t_fg).sum(), (p_fg | t_fg).sum()])
    i_bg, u_bg, i_fg, u_fg = (int(v) for v in out.tolist())
    return i_bg, u_bg, i_fg, u_fg


def _ratio(i: int, u: int) -> float:
    return float(np.float64(i) / np.float64(u)) if u > 0 else 0.0


class FSSMeter:
    """Accumulates one fold's test episodes.

    mIoU: for each fold class, sum foreground intersection and union over its episodes, IoU = I / U, mean over
    ALL fold classes (a class without episodes counts 0). FB-IoU: background and foreground I and U summed over
    every episode, mean of the two IoUs.
    """

    def __init__(self, classes: Sequence[int], ignore_index: int = IGNORE_INDEX) -> None:
        self.classes = [int(c) for c in classes]
        self.ignore_index = ignore_index
        self.inter = dict.fromkeys(self.classes, 0)
        self.union = dict.fromkeys(self.classes, 0)
        self.episodes = dict.fromkeys(self.classes, 0)
        self.fb_inter = [0, 0]
        self.fb_union = [0, 0]

    def update(self, pred, target, cls: int) -> None:
        """Add one episode: binary prediction and 0/1/255 target at original resolution, episode class ``cls``."""
        cls = int(cls)
        if cls not in self.inter:
            raise ValueError(f"class {cls} is not one of this meter's classes {self.classes}")
        i_bg, u_bg, i_fg, u_fg = episode_counts(pred, target, self.ignore_index)
        self.inter[cls] += i_fg
        self.union[cls] += u_fg
        self.episodes[cls] += 1
        self.fb_inter[0] += i_bg
        self.fb_union[0] += u_bg
        self.fb_inter[1] += i_fg
        self.fb_union[1] += u_fg

    def class_iou(self) -> dict[int, float]:
        return {c: _ratio(self.inter[c], self.union[c]) for c in self.classes}

    def miou(self) -> float:
        return float(np.mean(list(self.class_iou().values()), dtype=np.float64))

    def fb_iou(self) -> float:
        return 0.5 * (_ratio(self.fb_inter[0], self.fb_union[0]) + _ratio(self.fb_inter[1], self.fb_union[1]))

    def summary(self) -> dict:
        return {
            "miou": self.miou(),
            "fb_iou": self.fb_iou(),
            "class_iou": self.class_iou(),
            "episodes": dict(self.episodes),
        }


def mean_over_folds(values: Sequence[float]) -> float:
    """The tables' "Mean" column: the plain mean of the per-fold values."""
    return float(np.mean(np.asarray(values, dtype=np.float64)))
