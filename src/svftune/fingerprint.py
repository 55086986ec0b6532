"""Fingerprints of base weights and detection of tied singular values, for checkpoints that must land on the
right model.

Two fingerprints per weight:

- ``weight_sha256``: an exact hash of the weight's bytes, shape and dtype. Equal hashes mean the same weights.
  A copy re-saved in another dtype that holds the same values (float32 -> float64) is recognised exactly by
  casting it back to the recorded dtype before hashing (``same_values``).
- ``weight_sketch``: the Frobenius norm and a few projections ``a_j^T W b_j`` on fixed pseudo-random unit
  vectors. It tells "the same weights, rounded differently" (re-saved in float16/bfloat16) from "other weights":
  rounding moves each projection by about the relative rounding error (in units of ``||W||_F / sqrt(m n)``),
  while independent weights of the same shape differ by O(1) in those units. Leading singular values would not
  do: two random initialisations of a layer have almost the same spectrum.

The pseudo-random vectors come from a splitmix64 hash of the element index, computed with numpy's wrapping
uint64 arithmetic, so they are identical on every machine, device, process and library version.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .constants import exact_dtype

SKETCH_SIZE = 4
"""Number of random projections in a sketch."""
SKETCH_TOLERANCE = 0.01
"""Largest projection difference, in units of ``||W||_F / sqrt(m n)``, still counted as the same weights.

bfloat16 rounding moves a projection by ~2e-3 of that unit, a 1% change of the weights by ~1e-2, and independent
weights by ~1.
"""
TIE_RTOL = 1e-6
"""Singular values whose gap is at most this fraction of the group's largest singular value are tied."""

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The name a checkpoint records for ``dtype``: ``"float32"`` for ``torch.float32``.

    Raises:
        TypeError: ``dtype`` is not one of the floating dtypes a checkpoint may hold (float16, bfloat16, float32,
            float64).
    """
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
    return _DTYPE_NAMES[dtype]


def digest_prefix(dtype: str, shape: Sequence[int]) -> bytes:
    """What ``weight_sha256`` hashes before a tensor's bytes: ``"{dtype};{shape};"``, e.g. ``float32;[8, 3];``."""
    return f"{dtype};{[int(d) for d in shape]};".encode()


def weight_sha256(weight: Tensor) -> str:
    """Hex sha256 of a tensor's dtype, shape and bytes (moved to the CPU, made contiguous).

    Checkpoints use it for the base weights' fingerprints and for the digest of every stored tensor.
    """
    data = weight.detach().to("cpu").contiguous()
    digest = hashlib.sha256(digest_prefix(dtype_name(data.dtype), data.shape))
    if data.numel():
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def same_values(weight: Tensor, sha256: str, dtype: str) -> bool:
    """Whether ``weight`` holds exactly the values hashed as ``sha256`` in ``dtype`` (possibly stored in another
    dtype, e.g. a float32 base re-saved as float64)."""
    target = DTYPES[dtype]
    if weight.dtype == target:
        return weight_sha256(weight) == sha256
    cast = weight.detach().to(target)
    if not torch.equal(cast.to(weight.dtype), weight.detach()):
        return False  # the cast loses information: not the same values
    return weight_sha256(cast) == sha256


def _splitmix64(index: np.ndarray) -> np.ndarray:
    z = index + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _unit_vectors(length: int, count: int, stream: int) -> Tensor:
    """``(length, count)`` float64 unit columns, fixed for ``(length, count, stream)`` everywhere."""
    with np.errstate(over="ignore"):
        index = np.arange(length * count, dtype=np.uint64) + np.uint64((stream + 1) << 40)
        bits = _splitmix64(index) >> np.uint64(11)  # 53 random bits
    values = torch.from_numpy(bits.astype(np.float64) / float(1 << 53) * 2.0 - 1.0).reshape(count, length).T
    return values / values.norm(dim=0).clamp_min(1e-300)


def weight_sketch(weight: Tensor) -> tuple[float, list[float]]:
    """The tolerance fingerprint of a weight, computed in float64 (float32 on MPS).

    Args:
        weight: the weight; it is folded to ``(out, rest)``.

    Returns:
        ``(||W||_F, [a_j^T W b_j for j < SKETCH_SIZE])`` with fixed pseudo-random unit vectors ``a_j``, ``b_j``
        that are the same on every machine.
    """
    matrix = weight.detach().reshape(weight.shape[0], -1)
    exact = exact_dtype(matrix.device)
    matrix = matrix.to(exact)
    m, n = matrix.shape
    left = _unit_vectors(m, SKETCH_SIZE, 0).to(matrix.device, exact)
    right = _unit_vectors(n, SKETCH_SIZE, 1).to(matrix.device, exact)
    projections = (left * (matrix @ right)).sum(0)
    return float(matrix.norm()), [float(p) for p in projections.cpu()]


def sketch_distance(numel: int, fro: float, sketch: list[float], other: tuple[float, list[float]]) -> float:
    """How far two sketches are apart; at most ``SKETCH_TOLERANCE`` for the same weights rounded differently.

    The larger of the projections' largest difference in units of ``||W||_F / sqrt(numel)`` and the relative
    difference of the Frobenius norms.
    """
    other_fro, other_sketch = other
    top = max(fro, other_fro)
    if top == 0.0:
        return 0.0
    unit = top / math.sqrt(max(numel, 1))
    worst = max((abs(a - b) for a, b in zip(sketch, other_sketch, strict=True)), default=0.0)
    return max(worst / unit, abs(fro - other_fro) / top)


def tied_groups(values: Tensor, rtol: float = TIE_RTOL) -> list[tuple[int, int]]:
    """Find the runs of (near-)tied singular values in one descending vector.

    Neighbours closer than ``rtol * max(values)`` are tied, so a run of tiny values (a zero-padded or
    rank-deficient weight) is one group too. Runs of length one are not returned.

    Args:
        values: one group's singular values, in descending order.
        rtol: the tie tolerance, relative to the largest value.

    Returns:
        ``[(start, stop), ...]``: each run is ``values[start:stop]``.

    Examples:
        >>> import torch
        >>> from svftune.fingerprint import tied_groups
        >>> tied_groups(torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0, 0.0]))
        [(1, 3), (4, 6)]
    """
    s = values.detach().to("cpu", torch.float64)
    if s.numel() < 2:
        return []
    threshold = rtol * float(s.max().clamp_min(0))
    close = (s[:-1] - s[1:]).abs() <= threshold
    runs, start = [], None
    for i, tied in enumerate(close.tolist()):
        if tied and start is None:
            start = i
        elif not tied and start is not None:
            runs.append((start, i + 1))
            start = None
    if start is not None:
        runs.append((start, s.numel()))
    return runs


def is_null_group(values: Tensor, start: int, stop: int, rtol: float = TIE_RTOL) -> bool:
    """Whether a tied run is (numerically) zero: its left and right bases then pair arbitrarily."""
    s = values.detach().to("cpu", torch.float64)
    return float(s[start:stop].max()) <= rtol * float(s.max().clamp_min(0)) or float(s.max()) == 0.0
