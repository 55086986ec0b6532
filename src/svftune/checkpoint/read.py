"""``read_svf``: resolve a source (local file, local directory, Hub repo), read it with bounded reads, check it.

The order is always: sizes before reading, the safetensors header before any tensor, the metadata's schema
against the header (``format.validate``) before any tensor data, every tensor's sha256 (format 2) before a
tensor is built, then finite values. This is the only module that talks to ``svftune.hub``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from torch import Tensor

from .. import fingerprint as fp
from .._io import (
    MAX_JSON_BYTES,
    SafetensorsHeader,
    file_sha256,
    loads_json,
    read_bounded,
    read_safetensors_header,
    read_tensor,
    tensor_sha256,
)
from ..errors import SVFCheckpointError
from .format import CONFIG_NAME, FORMAT, STORED_DTYPES, SVFCheckpoint, check_header, validate

MAX_METADATA_BYTES = MAX_JSON_BYTES
"""Largest metadata a checkpoint may carry (the ``svftune`` header string, or ``svf_config.json``), in bytes."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def read_svf(source: str | os.PathLike, *, revision: str | None = None) -> SVFCheckpoint:
    """Read and validate a checkpoint without touching any model.

    Everything is checked before it is returned: the format and its version, every metadata field, the
    tensors against the metadata (names, shapes, float dtypes, sha256 digests, finite values) and, for a
    directory, the weights file's sha256. Sizes are checked before anything is read, so a hostile file is refused
    quickly and cheaply. Nothing is unpickled (safetensors and JSON only).

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
    form, path, label = resolve_source(source, revision)
    return _read_directory(path, label) if form == "directory" else _read_file(path)


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> tuple[str, Path, str]:
    """Where a checkpoint source is: ``("file" | "directory", local path, label for messages)``.

    A local file or directory wins; otherwise a ``"user/name"`` string is downloaded from the Hub.

    Raises:
        SVFCheckpointError: nothing at ``source`` and not a Hub repo id, or the download fails.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise SVFCheckpointError(f"a checkpoint source is a path or a Hub repo id, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        return "directory", path, str(path)
    if path.is_file():
        return "file", path, str(path)
    if isinstance(source, str) and _HUB_ID.match(source) and not path.exists():
        from ..hub import download

        return "directory", Path(download(source, revision=revision)), source
    raise SVFCheckpointError(
        f"no checkpoint at {source!s}: no such file or directory, and not a Hub repo id 'user/name'"
    )


def _read_file(path: Path) -> SVFCheckpoint:
    where = str(path)
    try:
        with open(path, "rb") as file:
            header = read_safetensors_header(file, where)
            metadata = header.metadata
            if metadata.get("format") != FORMAT or "svftune" not in metadata:
                if metadata.get("format") == FORMAT:
                    raise SVFCheckpointError(
                        f"{path} is the weights file of a checkpoint directory; load the directory that holds it "
                        f"(with its {CONFIG_NAME})"
                    )
                raise SVFCheckpointError(
                    f"{path} is a safetensors file but not an svftune checkpoint ({_foreign(header.tensors)})"
                )
            meta = loads_json(metadata["svftune"], f"{where}: the checkpoint metadata", MAX_METADATA_BYTES)
            check_header(meta, where)
            return assemble(meta, file, header, where, header.file_size)
    except OSError as err:
        raise SVFCheckpointError(f"cannot read {path}: {err}") from None


def _read_directory(path: Path, label: str) -> SVFCheckpoint:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise SVFCheckpointError(f"{label} holds no {CONFIG_NAME}: not an svftune checkpoint directory")
    for attempt in range(3):  # a writer may replace the checkpoint between reading the config and the weights
        raw = read_bounded(config_path, MAX_METADATA_BYTES, CONFIG_NAME)
        meta = loads_json(raw, str(config_path), MAX_METADATA_BYTES)
        check_header(meta, str(config_path))
        weights_name, digest = meta.pop("weights", None), meta.pop("weights_sha256", None)
        if not isinstance(weights_name, str) or not weights_name or Path(weights_name).name != weights_name:
            raise SVFCheckpointError(
                f"{config_path}: 'weights' must name a file in the same directory, got {str(weights_name)[:80]!r}"
            )
        if weights_name in (".", "..") or not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise SVFCheckpointError(f"{config_path}: 'weights'/'weights_sha256' are not what svftune writes")
        weights_path = path / weights_name
        try:
            file = open(weights_path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            if attempt < 2 and read_bounded(config_path, MAX_METADATA_BYTES, CONFIG_NAME) != raw:
                continue  # replaced meanwhile: read the new one
            raise SVFCheckpointError(
                f"{label}: {CONFIG_NAME} names {weights_name}, which is missing; copy the whole directory"
            ) from None
        except OSError as err:
            raise SVFCheckpointError(f"cannot read {weights_path}: {err}") from None
        with file:
            try:
                if file_sha256(file) != digest:
                    raise SVFCheckpointError(
                        f"{weights_path} is not the file {CONFIG_NAME} describes (its sha256 differs): it was changed "
                        "or damaged after saving; save the checkpoint again"
                    )
                header = read_safetensors_header(file, str(weights_path))
                if header.metadata.get("format") != FORMAT:
                    raise SVFCheckpointError(
                        f"{weights_path} is not an svftune weights file ({_foreign(header.tensors)})"
                    )
                return assemble(meta, file, header, label, header.file_size + len(raw))
            except OSError as err:
                raise SVFCheckpointError(f"cannot read {weights_path}: {err}") from None
    raise SVFCheckpointError(f"{label} kept changing while being read; try again")  # pragma: no cover


def assemble(meta: dict[str, Any], file: IO[bytes], header: SafetensorsHeader, where: str, size: int) -> SVFCheckpoint:
    """Check the metadata against the header, the digests against the data, then build the checkpoint."""
    layout = validate(meta, header.tensors, where)
    if layout.digests is not None:
        for name in layout.expected:
            info = header.tensors[name]
            prefix = fp.digest_prefix(STORED_DTYPES[info.dtype], info.shape)
            if tensor_sha256(file, header, name, prefix) != layout.digests[name]:
                raise SVFCheckpointError(
                    f"{where}: tensor {name} does not match its sha256 digest in the metadata: the file was changed "
                    "or damaged after saving; save the checkpoint again"
                )
    tensors = {name: read_tensor(file, header, name) for name in layout.expected}
    for name, tensor in tensors.items():
        if not tensor.isfinite().all():
            raise SVFCheckpointError(f"{where}: tensor {name} holds NaN or Inf values; the file is damaged")

    deltas, bases, factors = {}, {}, {}
    flat = tensors["delta_S"]
    for name, entry in layout.layers.items():
        deltas[name] = flat[entry.offset : entry.offset + entry.count].reshape(entry.groups, entry.rank)
        if entry.full_factors:
            factors[name] = (tensors[f"U/{name}"], tensors[f"Vh/{name}"])
        runs, k = [], 0
        for group, start, stop, action in entry.ties:
            if action == "basis":
                width = stop - start
                u = tensors[f"tie_U/{name}"][:, k : k + width]
                vh = tensors[f"tie_Vh/{name}"][k : k + width, :]
                runs.append((group, start, stop, u, vh))
                k += width
        if runs:
            bases[name] = runs
    extra = {pname: tensors[f"extra/{pname}"] for pname in layout.extra}
    modules = {
        module: {key: tensors[f"module/{module}/{key}"] for key in state}
        for module, state in meta.get("modules_to_save", {}).items()
    }
    return SVFCheckpoint(meta, layout.layers, deltas, bases, factors, extra, where, size, modules)


def parse_safetensors(data: bytes, where: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Parse the bytes of a safetensors file (through the checked header of ``svftune._io``).

    Args:
        data: the whole file.
        where: how to name the file in error messages.

    Returns:
        ``(header metadata, tensors)``.

    Raises:
        SVFCheckpointError: the bytes are empty, truncated or not a valid safetensors file.
    """
    file = io.BytesIO(data)
    header = read_safetensors_header(file, where)
    return header.metadata, {name: read_tensor(file, header, name) for name in header.tensors}


def _foreign(tensors: Mapping[str, Any]) -> str:
    names = [name[:60] for name in list(tensors)[:4]]
    shown = ", ".join(names[:3]) + (", ..." if len(tensors) > 3 else "")
    return f"it holds {len(tensors)} tensors: {shown}" if tensors else "it holds no tensors"
