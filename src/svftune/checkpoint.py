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
card. Every write is atomic. Loading never unpickles: safetensors and JSON only. Every problem with a file or
with the model it is loaded onto raises ``SVFCheckpointError`` before the model is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from . import fingerprint as fp
from .layers import SVFLayer, normalize_form, normalize_train, unsupported_reason
from .model import svf_layers

FORMAT = "svftune.svf_checkpoint"
"""The ``format`` field every checkpoint's metadata carries."""
FORMAT_VERSION = 1
"""The checkpoint format this svftune writes; it reads this version and older ones."""
CONFIG_NAME = "svf_config.json"
CARD_NAME = "README.md"
WEIGHTS_PREFIX = "svf_model"
MAX_METADATA_BYTES = 64 * 1024 * 1024
"""Largest metadata a checkpoint may carry (a safetensors header or svf_config.json)."""
SHOWN = 5
"""How many differing layers an error message lists."""
KINDS: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}
_TIE_ACTIONS = ("equal", "basis")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SVFCheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model it is loaded onto.

    The message says what was wrong and how to fix it. Whenever this is raised by ``load_svf``, the model is
    exactly as it was before the call.
    """


# ------------------------------------------------------------------------------------------------ data
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
            ``"equal"`` or ``"basis"`` (see the module documentation).
        full_factors: whether the whole ``U`` and ``Vh`` are stored (the layer trained ``U`` or ``V``).
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

    @property
    def count(self) -> int:
        """Singular values in the layer (all groups)."""
        return self.groups * self.rank

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out/groups, fan_in)`` of each group's matrix."""
        return self.shape[0] // self.groups, math.prod(self.shape[1:])

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
            "ties": self.ties,
        }
        if self.full_factors:
            entry["full_factors"] = True
        return entry


@dataclass
class SVFCheckpoint:
    """A parsed and validated checkpoint, as returned by ``read_svf``; ``load_svf`` also accepts one.

    Reading validates the metadata against the tensors completely, so every field below is consistent. All
    tensors are on the CPU, in the dtype they were saved in.

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
    """

    metadata: dict[str, Any]
    layers: dict[str, LayerEntry]
    deltas: dict[str, Tensor]  # layer -> (groups, rank) S - S0
    bases: dict[str, list[tuple[int, int, int, Tensor, Tensor]]]  # layer -> [(group, start, stop, U, Vh)]
    factors: dict[str, tuple[Tensor, Tensor]]  # layer -> full (U, Vh), for U/V-trained layers
    extra: dict[str, Tensor]  # other trained parameters
    source: str = "<memory>"
    size_bytes: int = 0

    @property
    def config(self) -> dict[str, Any]:
        """The ``apply_svf`` configuration trained with: ``train``, ``form``, ``freeze_bn``, ``freeze_others``."""
        return self.metadata["config"]

    @property
    def count(self) -> int:
        """Trained singular values stored."""
        return sum(entry.count for entry in self.layers.values())


# ------------------------------------------------------------------------------------------------ save
def save_svf(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, Any] | None = None,
    include_trainable: bool = True,
) -> Path:
    """Write the singular-value changes of every SVF layer of ``model`` to ``path``.

    Only what training changed is stored: ``S - S0`` per layer (plus, for tied singular values, the basis
    vectors that make the change well defined, and the whole ``U``/``Vh`` of layers that trained them), the
    other trainable parameters, and fingerprints of the base weights that let ``load_svf`` check it lands on
    the right model. Load it back with ``load_svf``; inspect it with ``read_svf``.

    Args:
        model: a model with SVF applied (``svftune.apply_svf``).
        path: a ``.safetensors`` file (metadata in its header), or a directory for sharing, written as
            ``svf_config.json`` + weights + ``README.md`` model card.
        dtype: storage dtype of the values (``torch.float16`` halves the file, at float16 precision);
            default: the singular values' own dtype.
        metadata: extra JSON-able information kept in the file, e.g. ``{"base_model": "resnet50.a1_in1k",
            "metrics": {"miou": 0.61}}`` (both appear on the model card).
        include_trainable: also store the other parameters that train (``requires_grad``), such as a new
            classification head, so that loading reproduces the whole fine-tuned model.

    Returns:
        The path written. The write is atomic: a crash or a full disk leaves the previous file (or nothing).

    Raises:
        SVFCheckpointError: the model has no SVF layer, its layers train different factors, a value is NaN or
            Inf (or out of ``dtype``'s range), ``metadata`` is not JSON-able, or a directory ``path`` exists as a
            file.
        TypeError: ``dtype`` is not float16, bfloat16, float32 or float64.

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> _ = torch.manual_seed(0)
        >>> model = svftune.apply_svf(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)))
        >>> with torch.no_grad():
        ...     _ = model[2].S.mul_(1.5)  # stands in for training
        >>> tmp = tempfile.TemporaryDirectory()
        >>> file = svftune.save_svf(model, os.path.join(tmp.name, "svf.safetensors"))
        >>> file.name
        'svf.safetensors'
        >>> folder = svftune.save_svf(model, os.path.join(tmp.name, "shared"), metadata={"base_model": "toy"})
        >>> sorted(os.listdir(folder))
        ['README.md', 'svf_config.json', 'svf_model-....safetensors']
        >>> tmp.cleanup()
    """
    layers = svf_layers(model)
    if not layers:
        raise SVFCheckpointError("save_svf found no SVF layer in the model: call svftune.apply_svf(model, ...) first")
    if dtype is not None:
        fp.dtype_name(dtype)
    user = _json_able(dict(metadata or {}), "metadata")
    config = getattr(model, "svf_config", None)
    train = normalize_train(config.train if config else layers[0][1].train_factors)
    form = normalize_form(config.form if config else layers[0][1].form)
    mixed = sorted({layer.train_factors for _, layer in layers})
    if len(mixed) > 1:
        raise SVFCheckpointError(f"the SVF layers train different factors ({mixed}); a checkpoint holds one `train`")

    entries, deltas, tensors = {}, [], {}
    for name, layer in layers:
        entry, delta, extra_tensors = _layer_record(name, layer, dtype)
        entries[name] = entry
        deltas.append(delta.reshape(-1))
        tensors.update(extra_tensors)
    value_dtype = dtype or max((d.dtype for d in deltas), key=lambda t: torch.finfo(t).bits)
    tensors["delta_S"] = torch.cat([d.to(value_dtype) for d in deltas])

    extra = {}
    if include_trainable:
        internal = {id(t) for _, layer in layers for t in (layer.U, layer.S, layer.Vh, layer.residual)}
        for pname, parameter in model.named_parameters():
            if parameter.requires_grad and id(parameter) not in internal:
                value = parameter.detach().to("cpu", dtype or parameter.dtype).contiguous()
                tensors[f"extra/{pname}"] = value
                extra[pname] = {"shape": list(value.shape), "dtype": fp.dtype_name(parameter.dtype)}
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            what = "a NaN or Inf" if dtype is None else f"a NaN or Inf (or a value out of {dtype}'s range)"
            raise SVFCheckpointError(f"save_svf: {key} holds {what}; fix the training or save in a wider dtype")

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "svftune_version": _version(),
        "config": {
            "train": train,
            "form": form,
            "freeze_bn": bool(config.freeze_bn) if config else True,
            "freeze_others": bool(config.freeze_others) if config else True,
        },
        "tie_rtol": fp.TIE_RTOL,
        "layers": {name: entry.to_json() for name, entry in entries.items()},
        "extra": extra,
        "user": user,
    }
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        data = safetensors.torch.save(tensors, metadata={"format": FORMAT, "svftune": _dumps(meta)})
        atomic_write(path, data)
    else:
        _save_directory(path, tensors, meta)
    return path


def _layer_record(name: str, layer: SVFLayer, dtype: torch.dtype | None) -> tuple[LayerEntry, Tensor, dict]:
    """The metadata entry, the ``S - S0`` change and the extra tensors (tie bases, full factors) of one layer."""
    weight = layer.base_weight
    fro, sketch = fp.weight_sketch(weight)
    delta = (layer.S.detach() - layer.S0.detach()).to("cpu")
    entry = LayerEntry(
        name=name,
        kind=type(layer).base_type.__name__,
        shape=list(weight.shape),
        dtype=fp.dtype_name(weight.dtype),
        groups=layer.groups,
        rank=layer.rank,
        sha256=fp.weight_sha256(weight),
        fro=_round(fro),
        sketch=[_round(v) for v in sketch],
    )
    tensors = {}
    if layer.residual is not None:  # U or V trained: the whole bases are the trained values
        entry.full_factors = True
        tensors[f"U/{name}"] = layer.U.detach().to("cpu", dtype or layer.U.dtype)
        tensors[f"Vh/{name}"] = layer.Vh.detach().to("cpu", dtype or layer.Vh.dtype)
        return entry, delta, tensors
    s0 = layer.S0.detach().to("cpu")
    basis_u, basis_vh = [], []
    for group in range(layer.groups):
        for start, stop in fp.tied_groups(s0[group]):
            run = delta[group, start:stop]
            equal = bool((run == run[0]).all())
            if equal and (run[0] == 0 or not fp.is_null_group(s0[group], start, stop)):
                entry.ties.append([group, start, stop, "equal"])
                continue
            entry.ties.append([group, start, stop, "basis"])
            basis_u.append(layer.U.detach()[group, :, start:stop].to("cpu"))
            basis_vh.append(layer.Vh.detach()[group, start:stop, :].to("cpu"))
    if basis_u:
        tensors[f"tie_U/{name}"] = torch.cat(basis_u, dim=1).to(dtype or layer.U.dtype)
        tensors[f"tie_Vh/{name}"] = torch.cat(basis_vh, dim=0).to(dtype or layer.Vh.dtype)
    return entry, delta, tensors


def _save_directory(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Weights under a content-addressed name, then svf_config.json (the commit point), then the card.

    A crash before svf_config.json is replaced leaves the old config pointing at the old weights file, which is
    only removed afterwards: the directory always loads as either the old or the new checkpoint.
    """
    if path.exists() and not path.is_dir():
        raise SVFCheckpointError(f"{path} exists and is not a directory; give a directory or a .safetensors path")
    path.mkdir(parents=True, exist_ok=True)
    data = safetensors.torch.save(tensors, metadata={"format": FORMAT})
    digest = hashlib.sha256(data).hexdigest()
    weights_name = f"{WEIGHTS_PREFIX}-{digest[:16]}.safetensors"
    atomic_write(path / weights_name, data)
    config = dict(meta, weights=weights_name, weights_sha256=digest)
    atomic_write(path / CONFIG_NAME, _pretty(config).encode())
    for old in path.glob(f"{WEIGHTS_PREFIX}-*.safetensors"):
        if old.name != weights_name:
            old.unlink(missing_ok=True)
    size = len(data) + (path / CONFIG_NAME).stat().st_size
    atomic_write(path / CARD_NAME, model_card(meta, size).encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def model_card(meta: Mapping[str, Any], size_bytes: int | None = None) -> str:
    """The README.md model card of a checkpoint directory.

    Args:
        meta: the checkpoint metadata (as in ``SVFCheckpoint.metadata``); ``user["base_model"]``,
            ``user["title"]`` and ``user["metrics"]`` appear on the card when present.
        size_bytes: the checkpoint's size, shown when given.

    Returns:
        Markdown with a Hugging Face front matter: base model, adapted layers, trainable count, size, metrics
        and how to load it.
    """
    user = meta.get("user", {})
    layers = meta["layers"]
    count = sum(entry["groups"] * entry["rank"] for entry in layers.values())
    base = user.get("base_model")
    lines = ["---", "library_name: svftune", "tags:", "- svftune", "- singular-value-fine-tuning"]
    if isinstance(base, str):
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {user.get('title', 'SVF checkpoint')}", ""]
    lines.append(
        "Singular Value Fine-tuning checkpoint: only the changes of the singular values of the adapted layers, "
        "loaded onto the base model with `svftune.load_svf(model, source)`, which checks that it is the base "
        "these values were trained on."
    )
    lines += ["", f"- Base model: {base if isinstance(base, str) else 'not recorded'}"]
    lines.append(f"- Adapted layers: {len(layers)} ({_summarize_names(list(layers))})")
    lines.append(f"- Trainable singular values: {count:,d} (train={meta['config']['train']})")
    if meta.get("extra"):
        lines.append(f"- Other trained parameters: {', '.join(meta['extra'])}")
    if size_bytes is not None:
        lines.append(f"- Checkpoint size: {size_bytes:,d} bytes")
    lines.append(f"- svftune {meta['svftune_version']}, format {meta['format_version']}")
    metrics = user.get("metrics")
    if isinstance(metrics, Mapping) and metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in metrics.items()]
    lines += ["", "## Use", "", "```python", "import svftune", "", "model = ...  # the base model"]
    lines += ["svftune.load_svf(model, 'path or user/repo')", "```", ""]
    return "\n".join(lines)


def _summarize_names(names: list[str]) -> str:
    tops = []
    for name in names:
        top = name.split(".")[0]
        if top not in tops:
            tops.append(top)
    return ", ".join(tops[:8]) + (", ..." if len(tops) > 8 else "")


# ------------------------------------------------------------------------------------------------ read
def read_svf(source: str | os.PathLike, *, revision: str | None = None) -> SVFCheckpoint:
    """Read and validate a checkpoint without touching any model.

    Everything is checked before it is returned: the format and its version, the metadata's structure, the
    tensors against the metadata (names, shapes, float dtypes, finite values) and, for a directory, the weights
    file's sha256. Nothing is unpickled (safetensors and JSON only).

    Args:
        source: a ``.safetensors`` file, a checkpoint directory, or a Hugging Face Hub repo id ``"user/name"``
            (used when no such local path exists; needs ``huggingface_hub``).
        revision: Hub branch, tag or commit when ``source`` is a repo id.

    Returns:
        The parsed checkpoint.

    Raises:
        SVFCheckpointError: nothing is found at ``source``, or it is not a valid svftune checkpoint (the message
            says what is wrong), or it was written by a newer checkpoint format, or the Hub download fails.
        ImportError: ``source`` is a Hub repo id and ``huggingface_hub`` is not installed.

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> _ = torch.manual_seed(0)
        >>> model = svftune.apply_svf(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = svftune.save_svf(model, os.path.join(tmp.name, "svf.safetensors"))
        >>> checkpoint = svftune.read_svf(path)
        >>> checkpoint.count, sorted(checkpoint.layers), checkpoint.config["train"]
        (12, ['0', '2'], 'S')
        >>> checkpoint.layers["0"].kind, checkpoint.layers["0"].shape, tuple(checkpoint.deltas["0"].shape)
        ('Conv2d', [8, 3, 3, 3], (1, 8))
        >>> tmp.cleanup()
    """
    path = Path(source)
    if path.is_dir():
        return _read_directory(path)
    if path.is_file():
        data = _read_bytes(path)
        header, tensors = parse_safetensors(data, str(path))
        if header.get("format") != FORMAT or "svftune" not in header:
            if header.get("format") == FORMAT:
                raise SVFCheckpointError(
                    f"{path} is the weights file of a checkpoint directory; load the directory that holds it "
                    f"(with its {CONFIG_NAME})"
                )
            raise SVFCheckpointError(
                f"{path} is a safetensors file but not an svftune checkpoint ({_foreign(tensors)})"
            )
        meta = _loads(header["svftune"], str(path))
        return _build(meta, tensors, str(path), len(data))
    if isinstance(source, str) and _HUB_ID.match(source) and not path.exists():
        from .hub import download

        return _read_directory(Path(download(source, revision=revision)), label=source)
    raise SVFCheckpointError(
        f"no checkpoint at {source!s}: no such file or directory, and not a Hub repo id 'user/name'"
    )


def _read_directory(path: Path, label: str | None = None) -> SVFCheckpoint:
    label = label or str(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise SVFCheckpointError(f"{label} holds no {CONFIG_NAME}: not an svftune checkpoint directory")
    raw = _read_bytes(config_path)
    meta = _loads(raw, str(config_path))
    weights_name, digest = meta.pop("weights", None), meta.pop("weights_sha256", None)
    if not isinstance(weights_name, str) or Path(weights_name).name != weights_name or not weights_name:
        raise SVFCheckpointError(
            f"{config_path}: 'weights' must name a file in the same directory, got {weights_name!r}"
        )
    weights_path = path / weights_name
    if not weights_path.is_file():
        raise SVFCheckpointError(
            f"{label}: {CONFIG_NAME} names {weights_name}, which is missing; copy the whole directory"
        )
    data = _read_bytes(weights_path)
    if hashlib.sha256(data).hexdigest() != digest:
        raise SVFCheckpointError(
            f"{weights_path} is not the file {CONFIG_NAME} describes (its sha256 differs): it was changed or "
            "damaged after saving; save the checkpoint again"
        )
    header, tensors = parse_safetensors(data, str(weights_path))
    if header.get("format") != FORMAT:
        raise SVFCheckpointError(f"{weights_path} is not an svftune weights file ({_foreign(tensors)})")
    return _build(meta, tensors, label, len(data) + len(raw))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SVFCheckpointError(f"cannot read {path}: {err}") from None


def parse_safetensors(data: bytes, where: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Parse the bytes of a safetensors file.

    Args:
        data: the whole file.
        where: how to name the file in error messages.

    Returns:
        ``(header metadata, tensors)``.

    Raises:
        SVFCheckpointError: the bytes are empty, truncated or not a valid safetensors file.
    """
    if len(data) < 8:
        raise SVFCheckpointError(f"{where} is empty or truncated ({len(data)} bytes): not a checkpoint")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, MAX_METADATA_BYTES):
        raise SVFCheckpointError(
            f"{where} is not a safetensors file, or is truncated (header of {size} bytes in a {len(data)}-byte file)"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SVFCheckpointError(f"{where} is not a safetensors file, or is corrupt: bad header ({err})") from None
    if not isinstance(header, dict):
        raise SVFCheckpointError(f"{where} is not a safetensors file: its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SVFCheckpointError(f"{where}: the safetensors metadata is not a string mapping")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # safetensors raises its own error type for every defect
        raise SVFCheckpointError(f"{where} is truncated or corrupt: {err}") from None
    return metadata, tensors


def _foreign(tensors: Mapping[str, Tensor]) -> str:
    names = list(tensors)
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"it holds {len(names)} tensors: {shown}" if names else "it holds no tensors"


def _loads(text: str | bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SVFCheckpointError(f"{where}: the checkpoint metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SVFCheckpointError(f"{where} is not an svftune checkpoint (no format {FORMAT!r} in its metadata)")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SVFCheckpointError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise SVFCheckpointError(
            f"{where} was written in checkpoint format {version} (svftune {meta.get('svftune_version')}); this "
            f"svftune {_version()} reads format {FORMAT_VERSION} and older: upgrade svftune"
        )
    return meta


class _Schema:
    """Checks of the metadata's structure, each raising an SVFCheckpointError that names the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field_name: str, expected: str, got: Any) -> None:
        shown = repr(got)
        shown = shown if len(shown) < 80 else shown[:77] + "..."
        raise SVFCheckpointError(
            f"{self.where}: metadata field {field_name} should be {expected}, got {shown}; the metadata is not what "
            "svftune writes (edited or damaged): save the checkpoint again"
        )

    def get(self, mapping: Mapping, key: str, kind: type | tuple, where: str) -> Any:
        value = mapping.get(key) if isinstance(mapping, Mapping) else None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(f"{where}.{key}", f"a {names}", value)
        return value

    def int_list(self, value: Any, where: str, positive: bool = True) -> list[int]:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok or (positive and not all(v > 0 for v in value)):
            self.fail(where, "a list of positive integers", value)
        return value

    def finite_float(self, value: Any, where: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(where, "a finite number", value)
        return float(value)


def _build(meta: dict[str, Any], tensors: dict[str, Tensor], source: str, size: int) -> SVFCheckpoint:
    """Validate the metadata and tensors against each other and split them per layer."""
    schema = _Schema(source)
    config = schema.get(meta, "config", dict, "")
    for key in ("train", "form"):
        schema.get(config, key, str, "config")
    try:
        normalize_train(config["train"])
        normalize_form(config["form"])
    except ValueError as err:
        raise SVFCheckpointError(f"{source}: config is not valid: {err}") from None
    for key in ("freeze_bn", "freeze_others"):
        schema.get(config, key, bool, "config")
    raw_layers = schema.get(meta, "layers", dict, "")
    if not raw_layers:
        schema.fail("layers", "a non-empty mapping", raw_layers)
    schema.get(meta, "extra", dict, "")
    schema.get(meta, "user", dict, "")

    layers: dict[str, LayerEntry] = {}
    for name, raw in raw_layers.items():
        where = f"layers[{name!r}]"
        if not isinstance(raw, dict):
            schema.fail(where, "a mapping", raw)
        kind = schema.get(raw, "kind", str, where)
        if kind not in KINDS:
            schema.fail(f"{where}.kind", f"one of {', '.join(KINDS)}", kind)
        dtype = schema.get(raw, "dtype", str, where)
        if dtype not in fp.DTYPES:
            schema.fail(f"{where}.dtype", f"one of {', '.join(fp.DTYPES)}", dtype)
        shape = schema.int_list(raw.get("shape"), f"{where}.shape")
        groups, rank = schema.get(raw, "groups", int, where), schema.get(raw, "rank", int, where)
        expected_dims = 2 if kind == "Linear" else int(kind[-2]) + 2
        if len(shape) != expected_dims or groups < 1 or shape[0] % groups:
            schema.fail(f"{where}.shape/groups", f"a {kind} weight shape divisible into the groups", (shape, groups))
        if rank != min(shape[0] // groups, math.prod(shape[1:])):
            schema.fail(f"{where}.rank", "min(out/groups, fan_in)", rank)
        sha = schema.get(raw, "sha256", str, where)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            schema.fail(f"{where}.sha256", "64 hex digits", sha)
        fro = schema.finite_float(raw.get("fro"), f"{where}.fro")
        sketch = raw.get("sketch")
        if not isinstance(sketch, list) or len(sketch) != fp.SKETCH_SIZE:
            schema.fail(f"{where}.sketch", f"a list of {fp.SKETCH_SIZE} numbers", sketch)
        sketch = [schema.finite_float(v, f"{where}.sketch") for v in sketch]
        full = raw.get("full_factors", False)
        if not isinstance(full, bool):
            schema.fail(f"{where}.full_factors", "true or false", full)
        ties = raw.get("ties")
        if not isinstance(ties, list):
            schema.fail(f"{where}.ties", "a list", ties)
        for tie in ties:
            ok = isinstance(tie, list) and len(tie) == 4 and tie[3] in _TIE_ACTIONS
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in tie[:3])
            if not ok or not (0 <= tie[0] < groups and 0 <= tie[1] < tie[2] <= rank):
                schema.fail(f"{where}.ties", "a list of [group, start, stop, 'equal'|'basis']", tie)
        layers[name] = LayerEntry(name, kind, shape, dtype, groups, rank, sha, fro, sketch, ties, full)

    train = config["train"]
    if any(entry.full_factors != ("U" in train or "V" in train) for entry in layers.values()):
        schema.fail("layers[*].full_factors", f"true exactly when train ({train!r}) contains U or V", "mismatch")

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
    extra_meta = meta["extra"]
    for pname, info in extra_meta.items():
        where = f"extra[{pname!r}]"
        if not isinstance(info, dict):
            schema.fail(where, "a mapping", info)
        shape = schema.int_list(info.get("shape"), f"{where}.shape", positive=False)
        if info.get("dtype") not in fp.DTYPES:
            schema.fail(f"{where}.dtype", f"one of {', '.join(fp.DTYPES)}", info.get("dtype"))
        expected[f"extra/{pname}"] = tuple(shape)

    missing = [k for k in expected if k not in tensors]
    unknown = [k for k in tensors if k not in expected]
    if missing or unknown:
        parts = ([f"missing {', '.join(missing[:SHOWN])}"] if missing else []) + (
            [f"unexpected {', '.join(unknown[:SHOWN])}"] if unknown else []
        )
        raise SVFCheckpointError(f"{source}: tensors do not match the metadata ({'; '.join(parts)}); save it again")
    for key, shape in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise SVFCheckpointError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}, metadata says {shape}")
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise SVFCheckpointError(f"{source}: tensor {key} has dtype {tensor.dtype}; checkpoints hold floats only")
        if not torch.isfinite(tensor).all():
            raise SVFCheckpointError(f"{source}: tensor {key} holds NaN or Inf values; the file is damaged")

    deltas, bases, factors, offset = {}, {}, {}, 0
    flat = tensors["delta_S"]
    for name, entry in layers.items():
        deltas[name] = flat[offset : offset + entry.count].reshape(entry.groups, entry.rank)
        offset += entry.count
        if entry.full_factors:
            factors[name] = (tensors[f"U/{name}"], tensors[f"Vh/{name}"])
        runs, k = [], 0
        for group, start, stop, action in entry.ties:
            if action == "basis":
                size_k = stop - start
                u = tensors[f"tie_U/{name}"][:, k : k + size_k]
                vh = tensors[f"tie_Vh/{name}"][k : k + size_k, :]
                runs.append((group, start, stop, u, vh))
                k += size_k
        if runs:
            bases[name] = runs
    extra = {pname: tensors[f"extra/{pname}"] for pname in extra_meta}
    return SVFCheckpoint(meta, layers, deltas, bases, factors, extra, source, size)


# ------------------------------------------------------------------------------------------------ load
def load_svf(
    model: nn.Module,
    source: str | os.PathLike | SVFCheckpoint,
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    revision: str | None = None,
    adapter_name: str = "default",
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Apply SVF to ``model`` as the checkpoint was trained and load its singular-value changes.

    Args:
        model: the plain base model, or one with SVF already applied to the same layers.
        source: a ``.safetensors`` file, a checkpoint directory, a Hub repo id ``"user/name"``, or an
            ``SVFCheckpoint`` from ``read_svf``.
        strict: ``True`` (default): every layer must exist with the same shape and the same base weights
            (bit-identical, the same values in another dtype, or the same weights rounded to another dtype),
            otherwise ``SVFCheckpointError`` names the first differing layers. ``False``: load the layers
            that match, warn about the others (for deliberate transfer to another, e.g. fine-tuned, base).
        device: move the model there after loading (``None``: leave it where it is).
        revision: Hub branch, tag or commit when ``source`` is a repo id.
        adapter_name: the name this checkpoint gets among the model's adapters (see ``svftune.adapters``);
            loading under an existing name replaces that adapter.
        cache_dir: opt-in on-disk cache of the decompositions, keyed by the base weights' fingerprint: a second
            load of the same base skips the SVDs (see ``svftune.cache``).

    Returns:
        ``model`` (modified in place). On any error the model is left exactly as it was.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        SVFCheckpointError: the checkpoint cannot be read, or does not fit the model (``strict=True``: any
            difference; ``strict=False``: no layer matches), or ``adapter_name`` is empty. The message lists the
            differing layers.
        ImportError: ``source`` is a Hub repo id and ``huggingface_hub`` is not installed.

    Warns:
        UserWarning: ``strict=False`` skipped layers that differ, or base weights match only within rounding
            (e.g. a base re-saved in float16).

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> from torch import nn
        >>> import svftune
        >>> def base():
        ...     torch.manual_seed(0)
        ...     return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> trained = svftune.apply_svf(base())
        >>> with torch.no_grad():
        ...     _ = trained[2].S.mul_(1.5)  # stands in for training
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = svftune.save_svf(trained, os.path.join(tmp.name, "svf.safetensors"))
        >>> model = svftune.load_svf(base(), path)  # applies SVF as it was trained, then loads the values
        >>> type(model[2]).__name__, svftune.trainable_parameters(model)
        ('SVFConv2d', (12, 272))
        >>> x = torch.randn(1, 3, 6, 6)
        >>> with torch.no_grad():
        ...     torch.allclose(model(x), trained(x), atol=1e-6)
        True
        >>> other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))  # other weights
        >>> svftune.load_svf(other, path)
        Traceback (most recent call last):
            ...
        svftune.checkpoint.SVFCheckpointError: checkpoint ... does not fit this model (2 difference(s)): ...
        >>> tmp.cleanup()
    """
    from .adapters import adapter_from_checkpoint, register_adapter

    if not isinstance(model, nn.Module):
        raise TypeError(f"load_svf expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise SVFCheckpointError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    checkpoint = source if isinstance(source, SVFCheckpoint) else read_svf(source, revision=revision)
    plan = check_model(model, checkpoint, strict=strict)
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    modes = {name: module.training for name, module in model.named_modules()}
    applied = False
    try:
        if plan.plain:
            _apply_for_checkpoint(model, checkpoint, plan, cache_dir)
            applied = True
        adapter = adapter_from_checkpoint(model, checkpoint, plan, adapter_name)
        register_adapter(model, adapter)
    except BaseException:
        if applied or (plan.plain and svf_layers(model)):
            from .model import unapply_svf

            unapply_svf(model)
            model.__dict__.pop("svf_adapters", None)
        for parameter, requires_grad in flags.values():
            parameter.requires_grad_(requires_grad)
        for name, module in model.named_modules():
            if name in modes:
                module.training = modes[name]
        raise
    if device is not None:
        model.to(device)
    return model


@dataclass
class LoadPlan:
    """What ``check_model`` found: which layers load, and how each base weight matched.

    Attributes:
        plain: whether the model had no SVF layer (``load_svf`` then applies SVF itself).
        loadable: names of the layers that load.
        match: per loadable layer, ``"exact"`` (bit-identical base), ``"same values"`` (the same values in another
            dtype) or ``"close"`` (equal within rounding to another dtype).
        hashes: per checked layer, the sha256 fingerprint of the model's base weight.
        problems: ``"name: reason"`` for every difference found.
        extra: names of the stored extra parameters that load.
    """

    plain: bool
    loadable: list[str]
    match: dict[str, str]  # layer -> "exact" | "same values" | "close"
    hashes: dict[str, str]  # layer -> sha256 of the model's base weight
    problems: list[str]
    extra: list[str]


def check_model(model: nn.Module, checkpoint: SVFCheckpoint, *, strict: bool = True) -> LoadPlan:
    """Compare a checkpoint with a model without changing it.

    Args:
        model: the model ``load_svf`` would load onto (plain, or with SVF applied).
        checkpoint: the checkpoint to compare.
        strict: raise on any difference (``True``), or warn and plan to load the matching layers only.

    Returns:
        The plan: which layers load and how each base weight matched.

    Raises:
        SVFCheckpointError: a difference with ``strict=True``, no loadable layer at all, or the model's SVF layers
            train other factors than the checkpoint's.
    """
    existing = dict(svf_layers(model))
    plain = not existing
    config = checkpoint.config
    problems: list[tuple[str, str]] = []
    if not plain:
        trains = {layer.train_factors for layer in existing.values()}
        if trains != {normalize_train(config["train"])}:
            raise SVFCheckpointError(
                f"the model has SVF applied with train={sorted(trains)}, the checkpoint was trained with "
                f"train={config['train']!r}; call svftune.unapply_svf(model) first and load onto the plain model"
            )
    modules = dict(model.named_modules())
    loadable, match, hashes = [], {}, {}
    for name, entry in checkpoint.layers.items():
        module = modules.get(name)
        if module is None:
            problems.append((name, "missing from the model"))
            continue
        base_type = KINDS[entry.kind]
        if plain:
            if isinstance(module, SVFLayer) or not isinstance(module, base_type):
                problems.append((name, f"is a {type(module).__name__} in the model, the checkpoint has a {entry.kind}"))
                continue
            reason = unsupported_reason(module)
            if reason is not None:
                problems.append((name, f"cannot be adapted: it {reason}"))
                continue
            weight, groups = module.weight, getattr(module, "groups", 1)
        elif not isinstance(module, SVFLayer) or module.base_type is not base_type:
            what = "is not adapted" if isinstance(module, base_type) else f"is a {type(module).__name__}"
            problems.append((name, f"{what} in the model, the checkpoint has an SVF {entry.kind} there"))
            continue
        else:
            weight, groups = module.base_weight, module.groups
        if list(weight.shape) != entry.shape or groups != entry.groups:
            problems.append(
                (
                    name,
                    f"weight shape {_shape(weight.shape)} groups={groups} in the model, "
                    f"{_shape(entry.shape)} groups={entry.groups} in the checkpoint",
                )
            )
            continue
        sha = fp.weight_sha256(weight)
        hashes[name] = sha
        if sha == entry.sha256:
            match[name] = "exact"
        elif fp.same_values(weight, entry.sha256, entry.dtype):
            match[name] = "same values"
        else:
            distance = fp.sketch_distance(weight.numel(), entry.fro, entry.sketch, fp.weight_sketch(weight))
            if distance > fp.SKETCH_TOLERANCE:
                problems.append(
                    (
                        name,
                        f"other base weights (sha256 {sha[:12]} in the model, {entry.sha256[:12]} in the "
                        f"checkpoint; random projections differ by {distance:.3g}, more than rounding to another "
                        f"dtype would, tolerance {fp.SKETCH_TOLERANCE})",
                    )
                )
                continue
            match[name] = "close"
        loadable.append(name)
    if not plain:
        problems += [
            (name, "is adapted in the model but not in the checkpoint")
            for name in existing
            if name not in checkpoint.layers
        ]
    parameters = dict(model.named_parameters())
    extra = []
    for pname, tensor in checkpoint.extra.items():
        parameter = parameters.get(pname)
        if parameter is None:
            problems.append((pname, "trained parameter stored in the checkpoint is missing from the model"))
        elif tuple(parameter.shape) != tuple(tensor.shape):
            problems.append(
                (
                    pname,
                    f"trained parameter has shape {_shape(parameter.shape)} in the model, "
                    f"{_shape(tensor.shape)} in the checkpoint",
                )
            )
        else:
            extra.append(pname)

    if problems:
        listed = "\n".join(f"  {name}: {reason}" for name, reason in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        head = f"checkpoint {checkpoint.source} does not fit this model ({len(problems)} difference(s)):\n"
        if strict or not loadable:
            advice = (
                "Load it onto the base model it was trained on, or pass strict=False to load only the matching "
                "layers (for deliberate transfer to another base)."
                if loadable
                else "No layer matches: this checkpoint belongs to another model."
            )
            raise SVFCheckpointError(head + listed + more + "\n" + advice)
        warnings.warn(head + listed + more + "\nstrict=False: loading the matching layers only.", stacklevel=3)
    close = [name for name in loadable if match[name] == "close"]
    if close:
        warnings.warn(
            f"the base weights of {len(close)} layer(s) ({', '.join(close[:SHOWN])}) are not bit-identical to the "
            "checkpoint's but equal within rounding (e.g. re-saved in float16/bfloat16): outputs differ from the "
            "trained model by that rounding",
            stacklevel=3,
        )
    return LoadPlan(plain, loadable, match, hashes, [f"{n}: {r}" for n, r in problems], extra)


def _apply_for_checkpoint(model: nn.Module, checkpoint: SVFCheckpoint, plan: LoadPlan, cache_dir: Any) -> None:
    """apply_svf with the checkpoint's configuration on exactly the loadable layers (optionally cached SVDs)."""
    from .model import apply_svf

    config = checkpoint.config
    names = set(plan.loadable)
    kwargs = {
        "layers": lambda name, module: name in names,
        "train": config["train"],
        "form": config["form"],
        "freeze_bn": config["freeze_bn"],
        "freeze_others": config["freeze_others"],
    }
    modules = dict(model.named_modules())
    modes = {name: modules[name].training for name in plan.loadable}
    if cache_dir is None:
        apply_svf(model, **kwargs)
    else:
        from .cache import DecompositionCache

        cache = DecompositionCache(cache_dir)
        weights = {modules[name].weight.data_ptr(): plan.hashes[name] for name in plan.loadable}
        full = "U" in config["train"] or "V" in config["train"]
        apply_svf(model, **kwargs, decompose=cache.provider(weights, float64=full))
    for name, layer in svf_layers(model):  # an SVF layer starts in training mode; keep the replaced layer's mode
        if name in modes:
            layer.train(modes[name])


# ------------------------------------------------------------------------------------------------ helpers
def _shape(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape)


def _round(value: float) -> float:
    return float(f"{value:.10g}")


def _pretty(meta: Mapping[str, Any]) -> str:
    """JSON with one line per top-level field and per layer: readable, and small for many layers."""
    lines = []
    for key, value in meta.items():
        if key == "layers":
            inner = ",\n".join(f"  {json.dumps(name)}: {_dumps(entry)}" for name, entry in value.items())
            lines.append(f' "layers": {{\n{inner}\n }}')
        else:
            lines.append(f" {json.dumps(key)}: {_dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _dumps(meta: Any) -> str:
    return json.dumps(meta, separators=(",", ":"), allow_nan=False)


def _json_able(value: dict[str, Any], argument: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise SVFCheckpointError(f"{argument} must be JSON-able (strings, numbers, lists, dicts): {err}") from None


def _version() -> str:
    from . import __version__

    return __version__
