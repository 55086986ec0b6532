"""Files from and to disk, safely: atomic writes, writer locks, bounded reads, safetensors headers, strict JSON.

Everything svftune writes (checkpoints, cache entries, the FSS example's run files) goes through
``atomic_write``: a temporary file in the target's folder, flushed, fsynced and renamed over the target, so a
crash leaves the old file or the new one, never half of one. ``writer_lock`` serialises writers of one target
across processes (``fcntl.flock`` on a hidden lock file next to it) and ``remove_leftovers`` deletes the
temporary files of writers that were killed.

Everything svftune reads from outside goes through the bounded readers here: a size is compared with its limit
before the bytes are read, a safetensors header is parsed and checked (dtypes, shapes, offsets tiling the data
section exactly) before any tensor is built, and JSON is parsed so that no input escapes as anything but
``SVFCheckpointError``: huge integers, deep nesting, invalid UTF-8, lone surrogates, duplicate keys and
``NaN``/``Infinity`` literals are all refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .errors import SVFCheckpointError

MAX_HEADER_BYTES = 4 * 1024 * 1024
"""Largest safetensors header (JSON) read, in bytes."""
MAX_JSON_BYTES = 4 * 1024 * 1024
"""Largest JSON document (metadata string, ``svf_config.json``) parsed, in bytes."""
MAX_TENSORS = 16_384
"""Most tensors a safetensors file read by svftune may hold."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of lists and objects accepted in a JSON document."""
MAX_JSON_ITEMS = 250_000
"""Most values in a JSON document, counted as commas plus opening brackets (also inside strings)."""
MAX_DIMS = 8
"""Most dimensions a stored tensor may have."""
_CHUNK = 1 << 20
_TEMP = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$")

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
"""Bytes per element of every safetensors dtype code."""
TORCH_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
"""The safetensors dtype codes svftune builds tensors of, and their torch dtypes."""
CODES = {dtype: code for code, dtype in TORCH_DTYPES.items()}


# ------------------------------------------------------------------------------------------------ writing
def atomic_write(path: str | os.PathLike, data: bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    Args:
        path: the file to write; its folder must exist.
        data: the bytes, or a function that writes them into the binary file object it is given (e.g.
            ``lambda f: torch.save(obj, f)``).

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist (the message names ``path``).
        OSError: the write failed (full disk, permissions); the previous file is unchanged and no temporary file
            is left behind.
    """
    path = Path(path)
    require_folder(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            if callable(data):
                data(file)
            else:
                file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def require_folder(path: str | os.PathLike) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` (not a temporary file) when its folder does not exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"cannot write {path}: its folder {path.parent} does not exist; create it first", str(path)
        )


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write`` of ``text`` encoded as UTF-8."""
    atomic_write(path, text.encode("utf-8"))


def _fsync_directory(directory: Path) -> None:
    try:  # make the rename itself durable; not possible on every platform
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def lock_path(path: str | os.PathLike) -> Path:
    """The hidden lock file that ``writer_lock`` uses for ``path``: ``.<name>.lock`` next to it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive writer lock of ``path`` (a file or a directory) for the ``with`` block.

    Writers of the same target in any process on this machine take turns. The lock file is removed on leaving;
    one left by a killed process is reused. Where ``fcntl`` does not exist (Windows) this does nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            current = os.stat(lock)
            if (held.st_ino, held.st_dev) == (current.st_ino, current.st_dev):
                break
        except FileNotFoundError:  # the holder removed it as we waited: take the new one
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # before unlocking: a waiter then sees another inode and retries
        os.close(fd)


def remove_leftovers(folder: str | os.PathLike, targets: Callable[[str], bool]) -> list[Path]:
    """Delete the temporary files ``atomic_write`` left in ``folder`` for targets named ``targets(name)``.

    Call it only while holding the targets' ``writer_lock``: then no live writer owns them.

    Returns:
        The files removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match and targets(match["target"]) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------------------ reading
def read_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """Read a whole small file, refusing it before reading when it is larger than ``limit`` bytes.

    Raises:
        SVFCheckpointError: it cannot be read, or it is larger than ``limit``.
    """
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise SVFCheckpointError(f"{path}: {what} of {size:,d} bytes is larger than the limit of {limit:,d}")
            data = file.read(limit + 1)
    except OSError as err:
        raise SVFCheckpointError(f"cannot read {path}: {err}") from None
    if len(data) > limit:
        raise SVFCheckpointError(f"{path}: {what} is larger than the limit of {limit:,d} bytes (it grew)")
    return data


def file_sha256(file: IO[bytes], start: int = 0, length: int | None = None, prefix: bytes = b"") -> str:
    """Hex sha256 of ``prefix`` and ``length`` bytes of ``file`` from ``start`` (to the end), read in 1 MiB chunks."""
    digest = hashlib.sha256(prefix)
    file.seek(start)
    left = math.inf if length is None else length
    while left > 0:
        chunk = file.read(int(min(_CHUNK, left)))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ JSON
class _Refused(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"duplicate key {dup[:60]!r}")
    return result


def _constant(text: str) -> Any:
    raise _Refused(f"the literal {text} (JSON has no NaN or Infinity)")


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_SUSPECT = re.compile(r"\\u[dD][89abAB]|[eE]\+?0*\d{3}|\d{300}")  # surrogate escapes, float overflow


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings (C-speed passes; the bracket string is bounded by the caller)."""
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    steps = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    levels = np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1))
    return int(levels.max())


def loads_json(data: str | bytes, where: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse untrusted JSON; every defect is an ``SVFCheckpointError`` that names ``where``.

    Refused, each before any costly work: more than ``limit`` bytes, invalid UTF-8, more than
    ``MAX_JSON_ITEMS`` values, nesting deeper than ``MAX_JSON_DEPTH``; then syntax errors,
    duplicate object keys, ``NaN``/``Infinity`` literals, numbers that overflow a float, integers beyond
    Python's digit limit and lone surrogate escapes.
    """
    try:
        if len(data) > limit:
            raise _Refused(f"{len(data):,d} bytes, more than the limit of {limit:,d}")
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        items = text.count(",") + text.count("{") + text.count("[")
        if items > MAX_JSON_ITEMS:
            raise _Refused(f"{items:,d} values, more than the limit of {MAX_JSON_ITEMS:,d}")
        if _depth(text) > MAX_JSON_DEPTH:
            raise _Refused(f"nested deeper than {MAX_JSON_DEPTH}")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_constant)
        if _SUSPECT.search(text):  # re-encoding finds what parsing let through: overflowing numbers, lone surrogates
            json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except UnicodeError as err:
        raise SVFCheckpointError(f"{where} is not valid UTF-8 ({err.reason})") from None
    except RecursionError:
        raise SVFCheckpointError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, Python's integer digit limit, inf on re-encoding, _Refused
        raise SVFCheckpointError(f"{where}: not valid JSON ({err})") from None
    return value


def dumps_json(value: Any) -> str:
    """Compact JSON without ``NaN``/``Infinity`` (raises ``ValueError`` on them)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


# ------------------------------------------------------------------------------------------------ safetensors
@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it: dtype code, shape, byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies."""
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed and checked safetensors header.

    Attributes:
        metadata: the ``__metadata__`` string map (empty when absent).
        tensors: every tensor's ``TensorInfo`` by name, in data order.
        data_start: file offset of the data section (8 + header length).
        file_size: size of the whole file.
    """

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int


def read_safetensors_header(file: IO[bytes], where: str) -> SafetensorsHeader:
    """Read and check the header of the safetensors file open in ``file``, without reading any tensor data.

    The 8-byte header length is compared with the file size and ``MAX_HEADER_BYTES`` before the header is read;
    the header must be a JSON object of at most ``MAX_TENSORS`` entries whose dtypes are known, whose shapes
    have at most ``MAX_DIMS`` non-negative dimensions, and whose byte ranges tile the data section exactly (no
    overlap, no gap, nothing after the last tensor).

    Raises:
        SVFCheckpointError: any of that is not so; the message says what.
    """
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    if size < 8:
        raise SVFCheckpointError(f"{where} is empty or truncated ({size} bytes): not a checkpoint")
    length = int.from_bytes(file.read(8), "little")
    if length > MAX_HEADER_BYTES or length > size - 8:
        why = f"more than the limit of {MAX_HEADER_BYTES:,d}" if length <= size - 8 else f"in a {size}-byte file"
        raise SVFCheckpointError(
            f"{where} is not a safetensors file, or is truncated (header of {length:,d} bytes, {why})"
        )
    raw = file.read(length)
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # cheap upper bound, before parsing
        raise SVFCheckpointError(f"{where} holds more than the limit of {MAX_TENSORS:,d} tensors")
    try:
        header = loads_json(raw.rstrip(b" "), "header", limit=MAX_HEADER_BYTES)
    except SVFCheckpointError as err:
        raise SVFCheckpointError(f"{where} is not a safetensors file, or is corrupt: bad {err}") from None
    if not isinstance(header, dict):
        raise SVFCheckpointError(f"{where} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SVFCheckpointError(f"{where}: the safetensors metadata is not a string mapping")
    if len(header) > MAX_TENSORS:
        raise SVFCheckpointError(f"{where} holds {len(header):,d} tensors, more than the limit of {MAX_TENSORS:,d}")
    infos = [_tensor_info(name, entry, where) for name, entry in header.items()]
    infos.sort(key=lambda info: (info.start, info.end))
    data_size, position = size - 8 - length, 0
    for info in infos:
        if info.start != position:
            raise SVFCheckpointError(
                f"{where} is corrupt: tensor {info.name} starts at byte {info.start} of the data, expected {position} "
                "(tensors overlap or leave a gap)"
            )
        position = info.end
    if position > data_size:
        raise SVFCheckpointError(
            f"{where} is truncated: its tensors need {position:,d} bytes of data, the file has {data_size:,d}"
        )
    if position < data_size:
        raise SVFCheckpointError(
            f"{where} is corrupt: {data_size - position:,d} unexpected bytes after its last tensor"
        )
    return SafetensorsHeader(metadata, {info.name: info for info in infos}, 8 + length, size)


def _tensor_info(name: str, entry: Any, where: str) -> TensorInfo:
    def bad(what: str) -> SVFCheckpointError:
        return SVFCheckpointError(f"{where} is not a valid safetensors file: tensor {name[:80]!r} {what}")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("is not {dtype, shape, data_offsets}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"has an unknown dtype {str(dtype)[:20]!r}")
    ints = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    if not ints or len(shape) > MAX_DIMS:
        raise bad(f"has a bad shape {str(shape)[:60]}")
    pair = isinstance(offsets, list) and len(offsets) == 2
    if not pair or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
        raise bad(f"has bad data_offsets {str(offsets)[:60]}")
    start, end = offsets
    if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise bad(f"has data_offsets {offsets} that do not fit its shape {shape} and dtype {dtype}")
    return TensorInfo(name, dtype, tuple(shape), start, end)


def read_tensor(file: IO[bytes], header: SafetensorsHeader, name: str) -> torch.Tensor:
    """Build one tensor of a checked header from the file (a copy, on the CPU)."""
    info = header.tensors[name]
    dtype = TORCH_DTYPES.get(info.dtype)
    if dtype is None:
        raise SVFCheckpointError(f"tensor {name} has dtype {info.dtype}, which svftune does not read")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    file.seek(header.data_start + info.start)
    buffer = bytearray(info.nbytes)
    if file.readinto(buffer) != info.nbytes:
        raise SVFCheckpointError(f"tensor {name}: the file ended early (it changed while being read)")
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)


def tensor_sha256(file: IO[bytes], header: SafetensorsHeader, name: str, prefix: bytes) -> str:
    """Hex sha256 of ``prefix`` and the stored bytes of tensor ``name``, streamed (nothing is materialised)."""
    info = header.tensors[name]
    return file_sha256(file, header.data_start + info.start, info.nbytes, prefix)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise CPU tensors as a safetensors file (through the safetensors library)."""
    import safetensors.torch

    return safetensors.torch.save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata)


def read_safetensors(
    path: str | os.PathLike, where: str | None = None
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read a whole safetensors file through the checked header: ``(metadata, tensors)``.

    Raises:
        SVFCheckpointError: it cannot be read or is not a valid safetensors file.
    """
    where = where or str(path)
    try:
        with open(path, "rb") as file:
            header = read_safetensors_header(file, where)
            return header.metadata, {name: read_tensor(file, header, name) for name in header.tensors}
    except OSError as err:
        raise SVFCheckpointError(f"cannot read {where}: {err}") from None
