"""Trained singular values held as a change from the base values ``S0``, with an exact round trip.

Adapters and checkpoints hold ``S - S0``. Computed and added back in S's own dtype, that is exact only while S
stays within a factor of two of S0 (Sterbenz's lemma): a small singular value trained further than that came back
one unit in the last place off. ``change`` keeps the difference in S's dtype where adding it back gives S bit for
bit, and otherwise in the exact dtype (float64, in which the difference of two narrower floats is exact);
``restore`` always adds in the exact dtype and rounds once, so both kinds of change give S back. Values that
are float64 themselves have no wider dtype: they come back within one rounding of the larger of S and S0.

    >>> import torch
    >>> s0, s = torch.tensor([1.0, 0.01]), torch.tensor([1.5, 0.0001])
    >>> (s0 + (s - s0)).eq(s).tolist()      # float32 arithmetic loses the shrunken value
    [True, False]
    >>> delta = change(s, s0)
    >>> delta.dtype, restore(s0, delta, s.dtype).eq(s).tolist()
    (torch.float64, [True, True])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .constants import exact_dtype

__all__ = ["change", "keep_precision", "restore"]


def restore(base: Tensor, delta: Tensor, dtype: torch.dtype) -> Tensor:
    """``base + delta`` added in the exact dtype of ``base``'s device and rounded once to ``dtype``."""
    exact = exact_dtype(base.device)
    return (base.to(exact) + delta.to(base.device, exact)).to(dtype)


def change(values: Tensor, base: Tensor) -> Tensor:
    """``values - base`` such that ``restore(base, change, values.dtype)`` is ``values`` again.

    In ``values``' dtype where that round-trips (the usual case: the change then costs no extra bytes), otherwise
    in the exact dtype of the device.
    """
    delta = values - base
    if torch.equal(restore(base, delta, values.dtype), values):
        return delta
    exact = exact_dtype(values.device)
    return values.to(exact) - base.to(exact)


def keep_precision(delta: Tensor, like: Tensor) -> Tensor:
    """``delta`` on ``like``'s device, in ``like``'s dtype or wider when ``delta`` is wider (up to the device's
    exact dtype): a checkpoint's change may be stored wider than the values it changes, to round-trip them."""
    wider = torch.promote_types(delta.dtype, like.dtype)
    exact = exact_dtype(like.device)
    dtype = wider if torch.finfo(wider).bits <= torch.finfo(exact).bits else exact
    return delta.to(like.device, dtype)
