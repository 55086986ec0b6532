"""Opt-in on-disk cache of the decompositions SVF needs, so a second load of the same base skips the SVDs.

Entries are keyed by the sha256 fingerprint of the base weight (its dtype, shape and bytes) and the shape of the
folded matrix, so an entry can never belong to other weights: a changed weight has another key. Each entry is a
safetensors file (never a pickle) written atomically, holding ``U`` and ``Vh`` in the weight's dtype (what the
SVF layer keeps anyway; float32 for half-precision weights) and ``S`` in float64. A stale or damaged entry is not
trusted on its checksum alone: before use, the factors are checked to be an SVD of the weight (shapes, finite,
sorted non-negative ``S``, and ``A x = U S Vh x``, ``U^T U y = y``, ``Vh Vh^T y = y`` on fixed random vectors).
An entry that fails is discarded with a warning and recomputed.

    svftune.load_svf(model, "ckpt", cache_dir="~/.cache/svftune")   # first load: SVDs, stored
    svftune.load_svf(model2, "ckpt", cache_dir="~/.cache/svftune")  # same base, new process: read back

The cache plugs in through ``apply_svf(..., decompose=cache.provider(...))``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ._io import atomic_write, read_safetensors, safetensors_bytes
from .constants import FACTOR_NAMES, exact_dtype
from .decompose import thin_svd
from .errors import SVFCheckpointError
from .fingerprint import _unit_vectors

_STORED = FACTOR_NAMES[:3]  # an entry holds U, S and Vh (never a residual)

CACHE_VERSION = 1
"""Version of the entry layout; part of every key, so entries of another version are never read."""
CHECK_TOLERANCE = 1e-5
"""Largest relative error of the checks above that a cached entry may show (float32 factors reach ~1e-6)."""
Factors = tuple[Tensor, Tensor, Tensor]


class DecompositionCache:
    """SVDs of base weights on disk under ``directory``, keyed by the weights' fingerprint.

    The usual way to use it is ``svftune.load_svf(model, source, cache_dir=directory)``, which builds one. For
    ``apply_svf``, pass ``decompose=cache.provider(fingerprints)``. Entries are checked before use, so a damaged
    or stale entry is recomputed (with a warning), never trusted.

    Args:
        directory: where the entries live (created on the first write; ``~`` is expanded).

    Attributes:
        directory: the cache directory.
        hits: decompositions served from the cache by this object's providers.
        misses: decompositions computed (and stored) by this object's providers.

    Examples:
        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> from svftune.fingerprint import weight_sha256
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> fingerprints = {m.weight.data_ptr(): weight_sha256(m.weight) for m in (model[0], model[2])}
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cache = svftune.DecompositionCache(tmp.name)
        >>> model = svftune.apply_svf(model, decompose=cache.provider(fingerprints))
        >>> cache.hits, cache.misses  # first time: computed and stored
        (0, 2)
        >>> again = svftune.DecompositionCache(tmp.name)  # e.g. in a new process
        >>> model = svftune.apply_svf(svftune.unapply_svf(model), decompose=again.provider(fingerprints))
        >>> again.hits, again.misses
        (2, 0)
        >>> tmp.cleanup()
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(weight_sha256: str, shape: tuple[int, ...]) -> str:
        """Entry name for a weight with this fingerprint, folded to ``shape``.

        Args:
            weight_sha256: the weight's fingerprint (``svftune.fingerprint.weight_sha256``).
            shape: the shape of the folded ``(groups, out/groups, fan_in)`` matrices.

        Returns:
            A hex sha256 that also covers the cache format version.
        """
        return hashlib.sha256(f"svftune-svd-v{CACHE_VERSION};{weight_sha256};{list(shape)}".encode()).hexdigest()

    def path(self, key: str) -> Path:
        """Where the entry ``key`` is stored: ``directory/<first two hex digits>/<key>.safetensors``."""
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str, matrices: Tensor, float64: bool = True) -> Factors | None:
        """Read the cached decomposition of ``matrices``, checking it is one.

        An entry that cannot be read, belongs to another key, or is not an SVD of ``matrices`` is deleted with a
        warning.

        Args:
            key: the entry name (``key``).
            matrices: the ``(groups, m, n)`` matrices the entry should decompose; the factors are checked against
                them and moved to their device.
            float64: return ``U`` and ``Vh`` in float64. ``False`` returns them as stored (in the weight's
                dtype), which spares two copies when the caller casts them to that dtype anyway.

        Returns:
            ``(U, S, Vh)`` (``S`` in float64; float32 on a device without float64), or ``None`` when the entry is
            missing, stale or damaged.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            header, tensors = read_safetensors(path)  # bounded, checked header; never unpickles
            if header.get("key") != key or set(tensors) != set(_STORED):
                raise SVFCheckpointError("it belongs to another weight")
            exact = exact_dtype(matrices.device)  # float64, or float32 where the device has none
            u, s, vh = (tensors[n].to(matrices.device, exact if n == "S" else None) for n in _STORED)
            problem = svd_problem(matrices, u, s, vh)
            if problem:
                raise SVFCheckpointError(problem)
        except (OSError, SVFCheckpointError) as err:
            warnings.warn(f"svftune cache: discarding {path} ({err}); recomputing the decomposition", stacklevel=2)
            path.unlink(missing_ok=True)
            return None
        if float64:
            u, vh = u.to(exact), vh.to(exact)
        return u, s.to(exact), vh

    def put(self, key: str, matrices: Tensor, factors: Factors) -> None:
        """Store the decomposition of ``matrices`` under ``key``, atomically.

        ``U`` and ``Vh`` are stored in the weight's dtype (float32 for half-precision weights), ``S`` in float64.
        A failure to write (full disk, read-only directory) only warns.

        Args:
            key: the entry name (``key``).
            matrices: the decomposed matrices (for their dtype).
            factors: their ``(U, S, Vh)``.
        """
        storage = matrices.dtype if matrices.dtype in (torch.float32, torch.float64) else torch.float32
        u, s, vh = factors
        stored = (u.to("cpu", storage), s.to("cpu", torch.float64), vh.to("cpu", storage))
        tensors = {name: t.contiguous() for name, t in zip(_STORED, stored, strict=True)}
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, safetensors_bytes(tensors, {"key": key, "version": str(CACHE_VERSION)}))
        except OSError as err:
            warnings.warn(f"svftune cache: could not write {path} ({err}); continuing without caching", stacklevel=2)

    def provider(self, fingerprints: dict[int, str], float64: bool = True) -> Callable[[Tensor], Factors]:
        """A stand-in for ``thin_svd`` that serves known weights from the cache, for ``apply_svf(decompose=...)``.

        Matrices whose ``data_ptr()`` is in ``fingerprints`` (the layers' weights; the folded matrices an SVF layer
        decomposes are views of them) are read from the cache, or decomposed with ``svftune.thin_svd`` and
        stored. Any other matrix is decomposed without caching. Counts go to ``hits`` and ``misses``.

        Args:
            fingerprints: ``{weight.data_ptr(): weight_sha256(weight)}`` of the weights to cache.
            float64: ``False``: cached ``U``/``Vh`` come back in the weight's dtype (enough when only ``S`` trains:
                the SVF layer casts them to that dtype; ``U``/``V`` training computes a residual that wants float64).

        Returns:
            A function ``matrices -> (U, S, Vh)``.
        """

        def decompose(matrices: Tensor) -> Factors:
            weight_sha = fingerprints.get(matrices.data_ptr())
            if weight_sha is None:
                return thin_svd(matrices)
            key = self.key(weight_sha, tuple(matrices.shape))
            cached = self.get(key, matrices, float64)
            if cached is not None:
                self.hits += 1
                return cached
            self.misses += 1
            factors = thin_svd(matrices)
            self.put(key, matrices, factors)
            return factors

        return decompose


def svd_problem(matrices: Tensor, u: Tensor, s: Tensor, vh: Tensor) -> str | None:
    """Check that ``(u, s, vh)`` is a thin SVD of the ``(groups, m, n)`` ``matrices``.

    Checks shapes, finite, sorted and non-negative ``s``, and on fixed random vectors ``A x = U S Vh x``,
    ``U^T U y = y`` and ``Vh Vh^T y = y`` to a relative error of ``CHECK_TOLERANCE``.

    Returns:
        Why it is not one, or ``None`` when it is.
    """
    groups, m, n = matrices.shape
    r = min(m, n)
    if u.shape != (groups, m, r) or s.shape != (groups, r) or vh.shape != (groups, r, n):
        return f"shapes {tuple(u.shape)}, {tuple(s.shape)}, {tuple(vh.shape)} do not fit {tuple(matrices.shape)}"
    if not torch.isfinite(s).all() or (s < 0).any() or (s[:, :-1] < s[:, 1:]).any():
        return "its singular values are not finite, sorted and non-negative"
    # Matrix-vector checks in the factors' own dtype (at least float32): cheap, and a NaN or Inf anywhere in U
    # or Vh reaches the result, which then fails the comparison below.
    dtype = torch.promote_types(torch.promote_types(u.dtype, vh.dtype), torch.float32)
    a, u, vh = matrices.to(dtype), u.to(dtype), vh.to(dtype)
    x = _unit_vectors(n, 1, 7).to(a.device, dtype)
    y = _unit_vectors(r, 1, 8).to(a.device, dtype)
    scale = torch.linalg.matrix_norm(a).clamp_min(torch.finfo(dtype).tiny)
    rebuilt = (a @ x - u @ (s.to(dtype).unsqueeze(-1) * (vh @ x))).norm(dim=(1, 2)) / scale
    orth_u = (u.mT @ (u @ y) - y).norm(dim=(1, 2))
    orth_v = (vh @ (vh.mT @ y) - y).norm(dim=(1, 2))
    worst = max(float(rebuilt.max()), float(orth_u.max()), float(orth_v.max()))
    if not worst <= CHECK_TOLERANCE:  # also catches NaN
        return f"it is not an SVD of the weight (relative error {worst:.2g})"
    return None
