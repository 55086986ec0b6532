"""Names and rules every svftune module shares: an SVF layer's tensor names, and the most exact dtype of a device.

One source for each: the SVF layers, ``apply_svf``/``merge_svf``, the checkpoint code and the decomposition cache
import them from here instead of writing them out. This module imports nothing from svftune, so any module may use
it without an import cycle.

Examples:
    >>> import torch
    >>> from svftune import constants
    >>> constants.FACTOR_NAMES
    ('U', 'S', 'Vh', 'residual')
    >>> [constants.FACTOR_OF_LETTER[c] for c in "USV"]
    ['U', 'S', 'Vh']
    >>> constants.exact_dtype(torch.device("cpu")), constants.exact_dtype(torch.device("mps"))
    (torch.float64, torch.float32)
"""

from __future__ import annotations

import torch

FACTOR_NAMES: tuple[str, ...] = ("U", "S", "Vh", "residual")
"""An SVF layer's factor tensors, in this order. ``residual`` exists only when ``U`` or ``V`` trains."""
FACTOR_OF_LETTER: dict[str, str] = {"U": "U", "S": "S", "V": "Vh"}
"""The factor tensor each letter of ``apply_svf(train=...)`` trains."""
BASE_WEIGHT_NAME = "base_weight"
"""The SVF layer attribute holding the original weight ``Parameter`` (frozen)."""
INITIAL_VALUES_NAME = "S0"
"""The SVF layer buffer holding ``S`` at decomposition time."""
STATE_NAMES: tuple[str, ...] = (BASE_WEIGHT_NAME, "bias", *FACTOR_NAMES, INITIAL_VALUES_NAME)
"""Every ``state_dict`` entry an SVF layer may have (``bias`` and ``residual`` only when present)."""
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
"""Weight dtypes whose singular values are kept in float32 so that small updates are not lost."""
NO_FLOAT64_DEVICES: frozenset[str] = frozenset({"mps"})
"""Device types without float64 (Apple MPS): exact work runs in float32 there."""


def exact_dtype(device: torch.device | str) -> torch.dtype:
    """The most exact float dtype ``device`` computes in: float64, or float32 on devices without float64.

    Used for the SVD, for rebuilding merged weights and for fingerprints.

    Args:
        device: a ``torch.device`` or a device string such as ``"cuda:0"``.

    Returns:
        ``torch.float64``, or ``torch.float32`` on device types listed in ``NO_FLOAT64_DEVICES``.
    """
    return torch.float32 if torch.device(device).type in NO_FLOAT64_DEVICES else torch.float64
