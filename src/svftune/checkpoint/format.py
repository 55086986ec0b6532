"""The checkpoint format: its constants, the parsed entries, and the one schema check of every metadata field.

Format version 2 (written since svftune 0.1.0's format-2 change) adds to version 1, in the same metadata:

- ``digests``: per stored tensor, the hex sha256 of ``"{dtype};{shape};"`` and its bytes (the rule of
  ``svftune.fingerprint.weight_sha256``), checked before anything is applied;
- per layer, ``delta_S``: ``[offset, length]``, the layer's slice of the flat ``delta_S`` tensor, so that no
  re-serialisation of the JSON (sorted keys, pretty-printing) changes which layer gets which values.

Version 1 files load exactly as before: their slices follow the order of ``layers``. ``validate`` below is the
single place that checks every field of either version; every wrong value is an ``SVFCheckpointError`` that names
the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .. import fingerprint as fp
from .._io import TensorInfo
from ..errors import SVFCheckpointError, SVFConfigError
from ..model import SVFConfig

FORMAT = "svftune.svf_checkpoint"
"""The ``format`` field every checkpoint's metadata carries."""
FORMAT_VERSION = 2
"""The checkpoint format this svftune writes; it reads this version and older ones."""
CONFIG_NAME = "svf_config.json"
CARD_NAME = "README.md"
WEIGHTS_PREFIX = "svf_model"
SHOWN = 5
"""How many differing layers an error message lists."""
STORED_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
"""The safetensors dtype codes a checkpoint's tensors may have, with their names."""
EXTRA_SECTIONS: dict[str, Any] = {}
"""Hook for optional metadata sections (e.g. whole modules saved alongside, ``modules_to_save``): section name ->
a validator ``(value, where) -> {tensor name: shape}`` of the tensors the section owns. A section's tensors get
digests like every other tensor; an unknown section in a file is refused."""
_TIE_ACTIONS = ("equal", "basis")
_LAYER_KEYS = {"kind", "shape", "dtype", "groups", "rank", "sha256", "fro", "sketch", "ties", "delta_S", "full_factors"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_VERSION_CHARS = 100


# ------------------------------------------------------------------------------------------------ layer kinds
@dataclass(frozen=True)
class Kind:
    """What the checkpoint code needs of a supported layer type (a view of the registry in ``svftune.layers``)."""

    name: str
    weight_dims: int
    transposed: bool
    plain: Any  # callable () -> plain class or None

    def matrix_shape(self, shape: list[int], groups: int) -> tuple[int, int]:
        """``(out/groups, fan_in)`` of each group's matrix."""
        if self.transposed:
            return shape[1], shape[0]
        return shape[0] // groups, math.prod(shape[1:])

    def plain_class(self) -> type[nn.Module] | None:
        """The plain layer class (``None`` when its library is not loaded)."""
        return self.plain()


def _kinds() -> dict[str, Kind]:
    from ..layers import LAYER_KINDS  # the one registry of supported layer types

    return {name: Kind(name, kind.weight_dims, kind.transposed, kind.plain_class) for name, kind in LAYER_KINDS.items()}


KINDS_REGISTRY = _kinds()
"""Every supported layer type by the name checkpoints record (from ``svftune.layers``)."""
KINDS: dict[str, type[nn.Module]] = {
    name: cls for name, kind in KINDS_REGISTRY.items() if (cls := kind.plain_class()) is not None
}
"""The plain layer classes of the kinds whose library was loaded when svftune was imported, by name (``"Linear"``
-> ``nn.Linear``...). Code that must see a library imported later (transformers' ``Conv1D``) asks
``KINDS_REGISTRY[name].plain_class()`` at use time instead."""


def kind_of_layer(layer: nn.Module) -> str:
    """The kind name an SVF layer is recorded under."""
    name = getattr(type(layer), "kind", None)
    return name if isinstance(name, str) else type(layer).base_type.__name__


# ------------------------------------------------------------------------------------------------ entries
@dataclass
class LayerEntry:
    """What a checkpoint records about one adapted layer (an entry of ``SVFCheckpoint.layers``).

    Attributes:
        name: the layer's module name in the model.
        kind: the plain layer type: ``"Linear"``, ``"Conv1d"``, ``"Conv2d"`` or ``"Conv3d"``.
        shape: shape of the base weight.
        dtype: dtype of the base weight, e.g. ``"float32"``.
        groups: the layer's ``groups`` (1 for Linear).
        rank: singular values per group, ``min(out/groups, fan_in)``.
        sha256: exact fingerprint of the base weight (dtype, shape and bytes).
        fro: Frobenius norm of the base weight (tolerance fingerprint).
        sketch: random projections of the base weight (tolerance fingerprint, see ``svftune.fingerprint``).
        ties: ``[group, start, stop, action]`` for every run of tied singular values, ``action`` being
            ``"equal"`` or ``"basis"`` (see the module documentation of ``svftune.checkpoint``).
        full_factors: whether the whole ``U`` and ``Vh`` are stored (the layer trained ``U`` or ``V``).
        offset: where the layer's values start in the flat ``delta_S`` tensor.
    """

    name: str
    kind: str
    shape: list[int]
    dtype: str
    groups: int
    rank: int
    sha256: str
    fro: float
    sketch: list[float]
    ties: list[list[Any]] = field(default_factory=list)
    full_factors: bool = False
    offset: int = 0

    @property
    def count(self) -> int:
        """Singular values in the layer (all groups)."""
        return self.groups * self.rank

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out/groups, fan_in)`` of each group's matrix."""
        kind = KINDS_REGISTRY.get(self.kind)
        if kind is None:
            return self.shape[0] // self.groups, math.prod(self.shape[1:])
        return kind.matrix_shape(self.shape, self.groups)

    def to_json(self) -> dict[str, Any]:
        """The entry as written into the checkpoint metadata (without the name, which is its key there)."""
        entry = {
            "kind": self.kind,
            "shape": self.shape,
            "dtype": self.dtype,
            "groups": self.groups,
            "rank": self.rank,
            "sha256": self.sha256,
            "fro": self.fro,
            "sketch": self.sketch,
            "delta_S": [self.offset, self.count],
        }
        if self.ties:  # format 2: absent means none (format 1 always wrote the list)
            entry["ties"] = self.ties
        if self.full_factors:
            entry["full_factors"] = True
        return entry


@dataclass
class SVFCheckpoint:
    """A parsed and validated checkpoint, as returned by ``read_svf``; ``load_svf`` also accepts one.

    Reading validates the metadata against the tensors completely (and, for format 2, every tensor's sha256), so
    every field below is consistent. All tensors are on the CPU, in the dtype they were saved in.

    Attributes:
        metadata: the whole JSON metadata: format and svftune versions, ``config``, ``layers``, ``extra`` and
            ``user`` (the ``metadata=`` given to ``save_svf``).
        layers: per adapted layer name, its ``LayerEntry`` (kind, shapes, fingerprints, tied runs).
        deltas: per layer, the ``(groups, rank)`` change of its singular values, ``S - S0``.
        bases: per layer with tied singular values stored as ``"basis"``, the runs
            ``(group, start, stop, U columns, Vh rows)`` as trained.
        factors: per layer that trained ``U`` or ``V``, its whole ``(U, Vh)``.
        extra: other trained parameters by name (e.g. a new head), saved with ``include_trainable=True``.
        source: where it was read from (a path or Hub repo id; ``"<memory>"`` when built otherwise).
        size_bytes: size of what was read (weights plus configuration file), in bytes.
        modules: per module saved whole (``apply_svf(modules_to_save=...)``), its floating-point parameters and
            buffers by name.
    """

    metadata: dict[str, Any]
    layers: dict[str, LayerEntry]
    deltas: dict[str, Tensor]  # layer -> (groups, rank) S - S0
    bases: dict[str, list[tuple[int, int, int, Tensor, Tensor]]]  # layer -> [(group, start, stop, U, Vh)]
    factors: dict[str, tuple[Tensor, Tensor]]  # layer -> full (U, Vh), for U/V-trained layers
    extra: dict[str, Tensor]  # other trained parameters
    source: str = "<memory>"
    size_bytes: int = 0
    modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        """The ``apply_svf`` configuration trained with: ``train``, ``form``, ``freeze_bn``, ``freeze_others`` (and
        ``tied`` since it is stored; absent means ``"error"``)."""
        return self.metadata["config"]

    @property
    def count(self) -> int:
        """Trained singular values stored."""
        return sum(entry.count for entry in self.layers.values())


# ------------------------------------------------------------------------------------------------ config
def config_to_json(config: Any, train: str, form: str) -> dict[str, Any]:
    """The ``config`` section for a model's ``SVFConfig`` (or, for ``None``, apply_svf's defaults with the layers'
    ``train`` and ``form``): ``SVFConfig.to_json``."""
    return (config if config is not None else SVFConfig([], train=train, form=form)).to_json()


def config_from_json(raw: Any, schema: Schema) -> dict[str, Any]:
    """Check a ``config`` section with ``SVFConfig.from_json``; returns it normalised, absent fields filled."""
    try:
        return SVFConfig.from_json(raw).to_json()
    except SVFConfigError as err:
        schema.fail("config" + (f".{err.field}" if err.field else ""), err.expected, err.got)
        raise  # unreachable: fail raises


# ------------------------------------------------------------------------------------------------ schema
class Schema:
    """Checks of the metadata's structure, each raising an ``SVFCheckpointError`` that names the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field_name: str, expected: str, got: Any) -> None:
        """Raise the error for ``field_name``, which should be ``expected`` but is ``got``."""
        shown = repr(got)
        shown = shown if len(shown) < 80 else shown[:77] + "..."
        raise SVFCheckpointError(
            f"{self.where}: metadata field {field_name} should be {expected}, got {shown}; the metadata is not what "
            "svftune writes (edited or damaged): save the checkpoint again"
        )

    def get(self, mapping: Any, key: str, kind: type | tuple, where: str) -> Any:
        """``mapping[key]``, which must be of type ``kind`` (bools are not numbers)."""
        value = mapping.get(key) if isinstance(mapping, Mapping) else None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(f"{where}.{key}" if where else key, f"a {names}", value)
        return value

    def int_list(self, value: Any, where: str, positive: bool = True, length: int | None = None) -> list[int]:
        """A list of (positive) integers, of ``length`` when given."""
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ok = ok and (length is None or len(value) == length)
        if not ok or not all(v > 0 if positive else v >= 0 for v in value):
            what = "positive" if positive else "non-negative"
            self.fail(where, f"a list of {length or ''}{' ' if length else ''}{what} integers", value)
        return value

    def finite_float(self, value: Any, where: str) -> float:
        """A finite number."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(where, "a finite number", value)
        return float(value)


@dataclass
class Layout:
    """What ``validate`` returns: the checked entries and the shape of every tensor the file must hold."""

    config: dict[str, Any]
    layers: dict[str, LayerEntry]
    extra: dict[str, dict[str, Any]]
    expected: dict[str, tuple[int, ...]]
    digests: dict[str, str] | None  # format 2: tensor name -> sha256


def check_header(meta: Any, where: str) -> int:
    """Check ``format`` and ``format_version`` of parsed metadata; returns the version."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SVFCheckpointError(f"{where} is not an svftune checkpoint (no format {FORMAT!r} in its metadata)")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SVFCheckpointError(f"{where}: format_version must be a positive integer, got {str(version)[:40]!r}")
    if version > FORMAT_VERSION:
        written = meta.get("svftune_version")
        written = written[:_MAX_VERSION_CHARS] if isinstance(written, str) else "unknown"
        raise SVFCheckpointError(
            f"{where} was written in checkpoint format {version} (svftune {written}); this svftune reads format "
            f"{FORMAT_VERSION} and older: upgrade svftune"
        )
    return version


def validate(meta: dict[str, Any], tensors: Mapping[str, TensorInfo], where: str) -> Layout:
    """Check every metadata field, and the tensors' names, shapes and dtypes against it (no tensor data needed).

    Args:
        meta: the parsed metadata (``format`` and ``format_version`` already checked by ``check_header``).
        tensors: the tensors the file holds, as its safetensors header describes them.
        where: the file, for messages.

    Returns:
        The checked layout.

    Raises:
        SVFCheckpointError: the first wrong field or tensor, named.
    """
    schema = Schema(where)
    version = meta["format_version"]
    known = {"format", "format_version", "svftune_version", "config", "tie_rtol", "layers", "extra", "user"}
    if version >= 2:
        known |= {"digests", *EXTRA_SECTIONS}
        unknown = sorted(set(meta) - known)
        if unknown:
            schema.fail(unknown[0], "absent (not a field of format 2)", meta[unknown[0]])
    if "svftune_version" in meta:
        value = meta["svftune_version"]
        if not isinstance(value, str) or len(value) > _MAX_VERSION_CHARS:
            schema.fail("svftune_version", "a short string", value)
    if version >= 2 or "tie_rtol" in meta:
        rtol = schema.finite_float(meta.get("tie_rtol"), "tie_rtol")
        if not 0 <= rtol < 1:
            schema.fail("tie_rtol", "a number in [0, 1)", rtol)
    config = config_from_json(meta.get("config"), schema)
    raw_layers = schema.get(meta, "layers", dict, "")
    if not raw_layers:
        schema.fail("layers", "a non-empty mapping", raw_layers)
    raw_extra = schema.get(meta, "extra", dict, "")
    schema.get(meta, "user", dict, "")
    full = "U" in config["train"] or "V" in config["train"]

    layers: dict[str, LayerEntry] = {}
    offset = 0
    for name, raw in raw_layers.items():
        entry = _layer(schema, name, raw, version, offset)
        if entry.full_factors != full:
            schema.fail(
                f"layers[{name!r}].full_factors",
                f"true exactly when train ({config['train']!r}) has U or V",
                entry.full_factors,
            )
        layers[name] = entry
        offset += entry.count
    if version >= 2:  # explicit slices: they must tile delta_S exactly, in any order
        ordered = sorted(layers.values(), key=lambda e: e.offset)
        position = 0
        for entry in ordered:
            if entry.offset != position:
                schema.fail(
                    f"layers[{entry.name!r}].delta_S",
                    f"a slice starting at {position} (slices must tile delta_S)",
                    [entry.offset, entry.count],
                )
            position += entry.count
        layers = {entry.name: entry for entry in ordered}  # model order, whatever the JSON key order

    expected: dict[str, tuple[int, ...]] = {"delta_S": (sum(e.count for e in layers.values()),)}
    for name, entry in layers.items():
        m, n = entry.matrix_shape
        if entry.full_factors:
            expected[f"U/{name}"] = (entry.groups, m, entry.rank)
            expected[f"Vh/{name}"] = (entry.groups, entry.rank, n)
        k = sum(stop - start for _, start, stop, action in entry.ties if action == "basis")
        if k:
            expected[f"tie_U/{name}"] = (m, k)
            expected[f"tie_Vh/{name}"] = (k, n)
    extra = {}
    for pname, info in raw_extra.items():
        at = f"extra[{pname[:80]!r}]"
        if not pname or not isinstance(info, dict):
            schema.fail(at, "a mapping for a named parameter", info)
        shape = schema.int_list(info.get("shape"), f"{at}.shape", positive=False)
        if info.get("dtype") not in fp.DTYPES:
            schema.fail(f"{at}.dtype", f"one of {', '.join(fp.DTYPES)}", info.get("dtype"))
        extra[pname] = info
        expected[f"extra/{pname}"] = tuple(shape)
    for section, check in EXTRA_SECTIONS.items():
        if section in meta:
            expected.update(check(meta[section], f"{where}: {section}"))

    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:SHOWN])}"] if missing else []) + (
            [f"unexpected {', '.join(n[:80] for n in unexpected[:SHOWN])}"] if unexpected else []
        )
        raise SVFCheckpointError(f"{where}: tensors do not match the metadata ({'; '.join(parts)}); save it again")
    for key, shape in expected.items():
        info = tensors[key]
        if info.shape != shape:
            raise SVFCheckpointError(f"{where}: tensor {key} has shape {info.shape}, metadata says {shape}")
        if info.dtype not in STORED_DTYPES:
            raise SVFCheckpointError(f"{where}: tensor {key} has dtype {info.dtype}; checkpoints hold floats only")
    digests = None
    if version >= 2:
        digests = schema.get(meta, "digests", dict, "")
        for key, digest in digests.items():
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                schema.fail(f"digests[{key[:80]!r}]", "64 lowercase hex digits", digest)
        if set(digests) != set(expected):
            odd = sorted(set(digests) ^ set(expected))
            schema.fail("digests", "one sha256 per stored tensor", f"{len(odd)} name(s) differ, e.g. {odd[0]}")

    return Layout(config, layers, extra, expected, digests)


def _layer(schema: Schema, name: str, raw: Any, version: int, offset: int) -> LayerEntry:
    """Check one layer entry."""
    where = f"layers[{name[:80]!r}]"
    if not isinstance(raw, dict):
        schema.fail(where, "a mapping", raw)
    if version >= 2 and not set(raw) <= _LAYER_KEYS:
        odd = sorted(set(raw) - _LAYER_KEYS)[0]
        schema.fail(f"{where}.{odd[:40]}", "absent (not a field of format 2)", raw[odd])
    kind = schema.get(raw, "kind", str, where)
    if kind not in KINDS_REGISTRY:
        schema.fail(f"{where}.kind", f"one of {', '.join(KINDS_REGISTRY)}", kind)
    dtype = schema.get(raw, "dtype", str, where)
    if dtype not in fp.DTYPES:
        schema.fail(f"{where}.dtype", f"one of {', '.join(fp.DTYPES)}", dtype)
    dims = KINDS_REGISTRY[kind].weight_dims
    shape = schema.int_list(raw.get("shape"), f"{where}.shape", length=dims)
    groups, rank = schema.get(raw, "groups", int, where), schema.get(raw, "rank", int, where)
    if groups < 1 or shape[0] % groups or (KINDS_REGISTRY[kind].transposed and groups != 1):
        schema.fail(f"{where}.shape/groups", f"a {kind} weight shape divisible into the groups", (shape, groups))
    m, n = KINDS_REGISTRY[kind].matrix_shape(shape, groups)
    if rank != min(m, n):
        schema.fail(f"{where}.rank", "min(out/groups, fan_in)", rank)
    sha = schema.get(raw, "sha256", str, where)
    if not _HEX64.fullmatch(sha):
        schema.fail(f"{where}.sha256", "64 hex digits", sha)
    fro = schema.finite_float(raw.get("fro"), f"{where}.fro")
    if fro < 0:
        schema.fail(f"{where}.fro", "a non-negative number", fro)
    sketch = raw.get("sketch")
    if not isinstance(sketch, list) or len(sketch) != fp.SKETCH_SIZE:
        schema.fail(f"{where}.sketch", f"a list of {fp.SKETCH_SIZE} numbers", sketch)
    sketch = [schema.finite_float(v, f"{where}.sketch") for v in sketch]
    full = raw.get("full_factors", False)
    if not isinstance(full, bool):
        schema.fail(f"{where}.full_factors", "true or false", full)
    ties = raw.get("ties", [] if version >= 2 else None)
    if not isinstance(ties, list) or (full and ties):
        schema.fail(f"{where}.ties", "a list (empty for full_factors layers)", ties)
    previous = (-1, 0)
    for tie in ties:
        ok = isinstance(tie, list) and len(tie) == 4 and isinstance(tie[3], str) and tie[3] in _TIE_ACTIONS
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in tie[:3])
        ok = ok and 0 <= tie[0] < groups and 0 <= tie[1] < tie[2] <= rank
        ok = ok and (tie[0] > previous[0] or (tie[0] == previous[0] and tie[1] >= previous[1]))
        if not ok:
            schema.fail(
                f"{where}.ties", "a list of [group, start, stop, 'equal'|'basis'] in order, not overlapping", tie
            )
        previous = (tie[0], tie[2])
    count = groups * rank
    if version >= 2:
        offset = schema.int_list(raw.get("delta_S"), f"{where}.delta_S", positive=False, length=2)[0]
        if raw["delta_S"][1] != count:
            schema.fail(f"{where}.delta_S", f"[offset, {count}] (groups * rank values)", raw["delta_S"])
    return LayerEntry(name, kind, shape, dtype, groups, rank, sha, fro, sketch, ties, full, offset)
