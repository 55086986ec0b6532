"""Singular-value checkpoints: save only what SVF trained, load it back onto the right base model.

A checkpoint holds, per adapted layer, the change of its singular values ``S - S0`` (all layers packed into one
flat tensor, ``delta_S``), plus JSON metadata: format version, svftune version, the apply_svf configuration,
and per layer its kind, weight shape/dtype, groups, rank, an exact fingerprint of its base weight (sha256 of
dtype, shape and bytes) and a tolerance fingerprint (Frobenius norm and random projections, see
``svftune.fingerprint``).

Tied singular values. ``S - S0`` alone is only well defined when the re-computed decomposition has the same
singular vectors as the one trained on. Distinct values are safe (only signs can flip, and they cancel). Inside a
run of (nearly) tied values any rotation is a valid SVD, and a zero run pairs its left and right vectors
arbitrarily. For every tied run the file records ``[group, start, stop, action]`` under ``ties``:

- ``"equal"``: the change is the same for every value of a non-zero run (e.g. untouched): it acts on the whole
  subspace, whatever basis the new decomposition picks. Nothing more is stored.
- ``"basis"``: the changes differ, or the run is zero with a non-zero change. The run's left and right singular
  vectors as trained (``tie_U/<layer>``: ``(out/groups, k)``, ``tie_Vh/<layer>``: ``(k, fan_in)``, runs
  concatenated in order) are stored and written over the same columns of the new decomposition on load, so
  ``W + U diag(S - S0) Vh`` is exactly the trained weight again.

Layers trained with ``train`` containing ``U`` or ``V`` store their whole ``U/<layer>`` and ``Vh/<layer>``.
Other trainable parameters (e.g. a new classifier head) are stored under ``extra/<name>``.

Two forms: a single ``.safetensors`` file with the metadata in its header, or a directory (for sharing) with
``svf_config.json`` (the metadata plus the weights file's name and sha256), the weights file and a README model
card. Format 2 records every stored tensor's sha256 and each layer's slice of ``delta_S`` explicitly. Every write
is atomic, and writers of one path take turns. Loading never unpickles (safetensors and JSON only) and reads
with bounded sizes. Every problem with a file or with the model it is loaded onto raises ``SVFCheckpointError``
before the model is touched.

The package: ``format`` (constants, entries, the schema of every field), ``save``, ``read`` (resolves the source:
local file, local directory or Hub), ``load`` (plan, apply, roll back), ``card`` (the model card). The names
below are the public API; ``svftune.errors`` holds the exception types and ``svftune._io`` the file handling.
"""

from .._io import atomic_write
from ..errors import SVFAdapterError, SVFCheckpointError
from . import format as _format
from . import modules as _modules
from .card import model_card
from .format import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    SHOWN,
    WEIGHTS_PREFIX,
    LayerEntry,
    SVFCheckpoint,
)
from .load import LoadPlan, check_model, load_svf
from .read import MAX_METADATA_BYTES, parse_safetensors, read_svf, resolve_source
from .save import EXTRA_WRITERS, save_svf

_format.EXTRA_SECTIONS[_modules.SECTION] = _modules.check
EXTRA_WRITERS[_modules.SECTION] = _modules.write

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "MAX_METADATA_BYTES",
    "SHOWN",
    "WEIGHTS_PREFIX",
    "LayerEntry",
    "LoadPlan",
    "SVFAdapterError",
    "SVFCheckpoint",
    "SVFCheckpointError",
    "atomic_write",
    "check_model",
    "load_svf",
    "model_card",
    "parse_safetensors",
    "read_svf",
    "resolve_source",
    "save_svf",
]
