"""``save_svf``: write what SVF trained, in checkpoint format 2, atomically and safely against other writers.

Concurrency: a save holds the target's writer lock (``svftune._io.writer_lock``: ``fcntl.flock`` on the hidden file
``.<name>.lock`` next to the target) from its first write to its last, so processes saving to the same path take
turns and the last one's checkpoint is what stays, complete. Under the lock, the temporary files of saves that
were killed are removed first, and so are weights files no ``svf_config.json`` names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import fingerprint as fp
from .._io import atomic_write, dumps_json, remove_leftovers, require_folder, safetensors_bytes, writer_lock
from .._values import change
from ..errors import SVFCheckpointError
from ..layers import SVFLayer
from ..matching import peft_owned_names
from ..model import svf_layers
from .card import model_card
from .format import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_PREFIX,
    LayerEntry,
    config_to_json,
    kind_of_layer,
)
from .modules import module_tensors, saved_modules

EXTRA_WRITERS: dict[str, Callable[[nn.Module, torch.dtype | None], tuple[Any, dict[str, Tensor]] | None]] = {}
"""Hook for optional sections (see ``format.EXTRA_SECTIONS``): section name -> ``(model, dtype) -> (metadata,
tensors)`` or ``None`` when the model has nothing for it. Their tensors get digests like every other tensor."""


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
    the right model. Every stored tensor's sha256 is recorded, and checked on load. Load it back with
    ``load_svf``; inspect it with ``read_svf``.

    Args:
        model: a model with SVF applied (``svftune.apply_svf``).
        path: a ``.safetensors`` file (metadata in its header; its folder must exist), or a directory for sharing,
            written as ``svf_config.json`` + weights + ``README.md`` model card.
        dtype: storage dtype of the values (``torch.float16`` halves the file, at float16 precision);
            default: the singular values' own dtype.
        metadata: extra JSON-able information kept in the file, e.g. ``{"base_model": "resnet50.a1_in1k",
            "metrics": {"miou": 0.61}}`` (both appear on the model card).
        include_trainable: also store the other parameters that train (``requires_grad``), such as a new
            classification head, so that loading reproduces the whole fine-tuned model. The parameters of a PEFT
            adapter on the same model (``svftune.matching.peft_owned_names``) are not stored: PEFT's
            ``save_pretrained`` saves them.

    Returns:
        The path written. The write is atomic: a crash or a full disk leaves the previous file (or nothing).
        Processes saving to the same path at once take turns; the last one's checkpoint stays, complete.

    Raises:
        SVFCheckpointError: the model has no SVF layer, its layers train different factors, a value is NaN or
            Inf (or out of ``dtype``'s range), ``metadata`` is not JSON-able, or a directory ``path`` exists as a
            file.
        FileNotFoundError: the folder of a ``.safetensors`` path does not exist (the message names the path).
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
    meta, tensors = checkpoint_record(model, dtype=dtype, metadata=metadata, include_trainable=include_trainable)
    path = Path(path)
    if path.suffix == ".safetensors":
        data = safetensors_bytes(tensors, {"format": FORMAT, "svftune": dumps_json(meta)})
        require_folder(path)
        with writer_lock(path):
            remove_leftovers(path.parent, lambda target: target == path.name)
            atomic_write(path, data)
    else:
        _save_directory(path, tensors, meta)
    return path


def checkpoint_record(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, Any] | None = None,
    include_trainable: bool = True,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The metadata and the tensors ``save_svf`` writes for ``model`` (CPU, contiguous), digests included."""
    layers = svf_layers(model)
    if not layers:
        raise SVFCheckpointError("save_svf found no SVF layer in the model: call svftune.apply_svf(model, ...) first")
    if dtype is not None:
        fp.dtype_name(dtype)
    user = _json_able(dict(metadata or {}), "metadata")
    config = getattr(model, "svf_config", None)
    mixed = sorted({layer.train_factors for _, layer in layers})
    if len(mixed) > 1:
        raise SVFCheckpointError(f"the SVF layers train different factors ({mixed}); a checkpoint holds one `train`")
    train = config.train if config else layers[0][1].train_factors
    form = config.form if config else layers[0][1].form

    entries, deltas, tensors, offset = {}, [], {}, 0
    for name, layer in layers:
        entry, delta, layer_tensors = _layer_record(name, layer, dtype)
        entry.offset = offset
        offset += entry.count
        entries[name] = entry
        deltas.append(delta.reshape(-1))
        tensors.update(layer_tensors)
    value_dtype = dtype or max((d.dtype for d in deltas), key=lambda t: torch.finfo(t).bits)
    tensors["delta_S"] = torch.cat([d.to(value_dtype) for d in deltas])

    extra = {}
    if include_trainable:
        internal = {id(t) for _, layer in layers for t in (layer.U, layer.S, layer.Vh, layer.residual)}
        whole = module_tensors(model, saved_modules(model))  # stored in their own section
        internal |= {id(t) for state in whole.values() for t in state.values()}
        # another adapter's parameters (PEFT's LoRA layers, its modules_to_save copies): PEFT saves them itself
        internal |= {id(p) for owner in peft_owned_names(model) for p in model.get_submodule(owner).parameters()}
        for pname, parameter in model.named_parameters():
            if parameter.requires_grad and id(parameter) not in internal:
                value = parameter.detach().to("cpu", dtype or parameter.dtype).contiguous()
                tensors[f"extra/{pname}"] = value
                extra[pname] = {"shape": list(value.shape), "dtype": fp.dtype_name(parameter.dtype)}
    sections = {}
    for section, writer in EXTRA_WRITERS.items():
        written = writer(model, dtype)
        if written is not None:
            sections[section], section_tensors = written
            tensors.update(section_tensors)
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            what = "a NaN or Inf" if dtype is None else f"a NaN or Inf (or a value out of {dtype}'s range)"
            raise SVFCheckpointError(f"save_svf: {key} holds {what}; fix the training or save in a wider dtype")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "svftune_version": _version(),
        "config": config_to_json(config, train, form),
        "tie_rtol": fp.TIE_RTOL,
        "layers": {name: entry.to_json() for name, entry in entries.items()},
        "extra": extra,
        "user": user,
        **sections,
        "digests": {key: fp.weight_sha256(value) for key, value in tensors.items()},
    }
    return meta, tensors


def _layer_record(name: str, layer: SVFLayer, dtype: torch.dtype | None) -> tuple[LayerEntry, Tensor, dict]:
    """The metadata entry, the ``S - S0`` change and the extra tensors (tie bases, full factors) of one layer."""
    weight = layer.base_weight
    fro, sketch = fp.weight_sketch(weight)
    delta = change(layer.S.detach(), layer.S0.detach()).to("cpu")  # float64 where S - S0 is not exact
    entry = LayerEntry(
        name=name,
        kind=kind_of_layer(layer),
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
    """Under the writer lock: leftovers removed, weights under a content-addressed name, then svf_config.json (the
    commit point), then older weights removed, then the card.

    A crash before svf_config.json is replaced leaves the old config pointing at the old weights file, which is
    only removed afterwards: the directory always loads as either the old or the new checkpoint.
    """
    if path.exists() and not path.is_dir():
        raise SVFCheckpointError(f"{path} exists and is not a directory; give a directory or a .safetensors path")
    path.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes(tensors, {"format": FORMAT})
    digest = hashlib.sha256(data).hexdigest()
    weights_name = f"{WEIGHTS_PREFIX}-{digest[:16]}.safetensors"
    ours = (CONFIG_NAME, CARD_NAME)
    with writer_lock(path):
        remove_leftovers(path, lambda target: target in ours or target.startswith(f"{WEIGHTS_PREFIX}-"))
        atomic_write(path / weights_name, data)
        config = dict(meta, weights=weights_name, weights_sha256=digest)
        atomic_write(path / CONFIG_NAME, _pretty(config).encode())
        for old in path.glob(f"{WEIGHTS_PREFIX}-*.safetensors"):
            if old.name != weights_name:
                old.unlink(missing_ok=True)
        size = len(data) + (path / CONFIG_NAME).stat().st_size
        atomic_write(path / CARD_NAME, model_card(meta, size).encode())


def _round(value: float) -> float:
    return float(f"{value:.10g}")


def _pretty(meta: Mapping[str, Any]) -> str:
    """JSON with one line per top-level field and per layer: readable, and small for many layers."""
    lines = []
    for key, value in meta.items():
        if key == "layers":
            inner = ",\n".join(f"  {json.dumps(name)}: {dumps_json(entry)}" for name, entry in value.items())
            lines.append(f' "layers": {{\n{inner}\n }}')
        else:
            lines.append(f" {json.dumps(key)}: {dumps_json(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _json_able(value: dict[str, Any], argument: str) -> dict[str, Any]:
    try:
        return json.loads(dumps_json(value))
    except (TypeError, ValueError) as err:
        raise SVFCheckpointError(f"{argument} must be JSON-able (strings, numbers, lists, dicts): {err}") from None


def _version() -> str:
    from .. import __version__

    return __version__
