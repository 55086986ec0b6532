"""Exact singular value decompositions of (batches of) weight matrices.

SVF needs the full thin SVD of every adapted weight, with no truncation. We always decompose in float64
(float32 only on devices without float64, such as Apple MPS) and cast the factors once afterwards, so the
factors are as exact as the storage dtype allows whatever dtype the model runs in.

LAPACK's divide-and-conquer SVD is slow on strongly rectangular matrices (a 512 x 4608 conv weight, a VGG16
4096 x 25088 classifier). Reducing the matrix to its square triangular factor with a Householder QR first,
then decomposing that square factor, is exact (backward stable, like the SVD itself) and several times faster
there; see benchmarks/README.md for the measured numbers.

On CPU, matrices below ``SINGLE_THREAD_WORK`` multiply-adds are decomposed on one thread: multi-threaded
LAPACK gains little there, and on a busy machine (DataLoader workers, other jobs) its threads spin against each
other; we measured a 960 x 160 SVD go from 0.02 s to 1.8 s with 2 threads on a loaded 2-core machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from .constants import exact_dtype

QR_FIRST_ASPECT = 2.0
"""Aspect ratio (long side / short side) from which the QR-first route is used."""
SINGLE_THREAD_WORK = 2e10
"""``m * n * min(m, n)`` (summed over the batch) below which CPU decompositions run on one thread."""


def decomposition_dtype(device: torch.device) -> torch.dtype:
    """The most exact dtype ``device`` can run a float SVD in.

    Args:
        device: where the decomposition runs.

    Returns:
        ``torch.float64``, or ``torch.float32`` on Apple MPS, which has no float64 (the rule lives in
        ``svftune.constants.exact_dtype``).
    """
    return exact_dtype(device)


def thin_svd(matrices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``A = U @ diag(S) @ Vh`` of a matrix or a batch of matrices, computed in float64.

    The input is cast to float64 (float32 on devices without float64) and decomposed on its own device; strongly
    rectangular matrices (aspect ratio of at least ``QR_FIRST_ASPECT``) are reduced with a QR factorisation first,
    which is exact and several times faster there. Small CPU problems run on one thread (see the module
    documentation). This is what ``svftune.apply_svf`` uses for every layer unless given ``decompose=``.

    Args:
        matrices: ``(..., m, n)`` tensor of any floating dtype.

    Returns:
        ``U (..., m, r)``, ``S (..., r)`` (descending), ``Vh (..., r, n)`` with ``r = min(m, n)``,
        all in float64 (float32 on devices without float64).

    Raises:
        TypeError: ``matrices`` is not a floating-point tensor.

    Examples:
        >>> import torch
        >>> import svftune
        >>> _ = torch.manual_seed(0)
        >>> a = torch.randn(2, 8, 3)  # a batch of two 8 x 3 matrices
        >>> u, s, vh = svftune.thin_svd(a)
        >>> tuple(u.shape), tuple(s.shape), tuple(vh.shape), s.dtype
        ((2, 8, 3), (2, 3), (2, 3, 3), torch.float64)
        >>> torch.allclose(u @ torch.diag_embed(s) @ vh, a.double())
        True
        >>> bool((s[:, :-1] >= s[:, 1:]).all())  # descending
        True
    """
    if not matrices.is_floating_point():
        raise TypeError(f"thin_svd expects a floating-point tensor, got {matrices.dtype}")
    a = matrices.to(decomposition_dtype(matrices.device))
    m, n = a.shape[-2:]
    work = a.numel() * min(m, n)
    with _threads(1 if a.device.type == "cpu" and work < SINGLE_THREAD_WORK else None):
        return _thin_svd(a)


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None``: leave it)."""
    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m, n = a.shape[-2:]
    if max(m, n) < QR_FIRST_ASPECT * min(m, n):
        return torch.linalg.svd(a, full_matrices=False)
    if n > m:  # wide: A^T = Q R, so A = R^T Q^T and SVD(R^T) = U S Vh gives A = U S (Vh Q^T)
        q, r = torch.linalg.qr(a.mT)
        u, s, vh = torch.linalg.svd(r.mT)
        return u, s, vh @ q.mT
    q, r = torch.linalg.qr(a)  # tall: A = Q R, SVD(R) = U S Vh gives A = (Q U) S Vh
    u, s, vh = torch.linalg.svd(r)
    return q @ u, s, vh
