"""The optional ``modules_to_save`` section: whole modules that trained fully (``apply_svf(modules_to_save=...)``).

Written when ``svftune.model.modules_to_save(model)`` names modules: every floating-point parameter and buffer of
each such module is stored as the tensor ``module/<module>/<name>`` (with a digest, like every tensor), and the
section records ``{module: {name: {"shape": [...], "dtype": "float32"}}}``. Their parameters are then not stored
again under ``extra/``. ``load_svf`` applies SVF with the same ``modules_to_save`` and copies the values into the
modules (shared by every adapter of the model; switching adapters does not change them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import fingerprint as fp
from .format import Schema

SECTION = "modules_to_save"
PREFIX = "module/"


def saved_modules(model: nn.Module) -> list[str]:
    """The model's ``modules_to_save`` record (empty when none, or when svftune.model does not have one)."""
    from .. import model as model_module

    reader = getattr(model_module, "modules_to_save", None)
    return list(reader(model)) if reader is not None else []


def module_tensors(model: nn.Module, names: list[str]) -> dict[str, dict[str, Tensor]]:
    """``{module: {tensor name: tensor}}`` of the floating-point parameters and buffers of ``names``."""
    modules = dict(model.named_modules())
    result = {}
    for name in names:
        state = {**dict(modules[name].named_parameters()), **dict(modules[name].named_buffers())}
        result[name] = {key: value for key, value in state.items() if value.is_floating_point()}
    return result


def write(model: nn.Module, dtype: torch.dtype | None) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """The section and its tensors for ``save_svf`` (``None`` when the model has no ``modules_to_save``)."""
    names = saved_modules(model)
    if not names:
        return None
    meta, tensors = {}, {}
    for module, state in module_tensors(model, names).items():
        meta[module] = {}
        for key, value in state.items():
            stored = value.detach().to("cpu", dtype or value.dtype).contiguous()
            tensors[f"{PREFIX}{module}/{key}"] = stored
            meta[module][key] = {"shape": list(stored.shape), "dtype": fp.dtype_name(value.dtype)}
    return meta, tensors


def check(value: Any, where: str) -> dict[str, tuple[int, ...]]:
    """Validate the section; returns the shapes of the tensors it owns."""
    schema = Schema(where)
    if not isinstance(value, dict):
        schema.fail(SECTION, "a mapping of module names", value)
    expected = {}
    for module, state in value.items():
        at = f"{SECTION}[{module[:80]!r}]"
        if not module or not isinstance(state, dict):
            schema.fail(at, "a mapping of tensor names", state)
        for key, info in state.items():
            if not key or not isinstance(info, dict) or info.get("dtype") not in fp.DTYPES:
                schema.fail(f"{at}[{key[:40]!r}]", "{shape, dtype}", info)
            expected[f"{PREFIX}{module}/{key}"] = tuple(schema.int_list(info.get("shape"), f"{at}.shape", False))
    return expected


def problems(model: nn.Module, stored: dict[str, dict[str, Tensor]]) -> list[tuple[str, str]]:
    """``(module, reason)`` for every stored module the model lacks or whose tensors differ in shape."""
    modules = dict(model.named_modules())
    found = []
    for name, state in stored.items():
        if name not in modules:
            found.append((name, "module saved whole (modules_to_save) is missing from the model"))
            continue
        own = module_tensors(model, [name])[name]
        for key, tensor in state.items():
            if key not in own or tuple(own[key].shape) != tuple(tensor.shape):
                found.append((f"{name}.{key}", "saved whole (modules_to_save) with another shape or missing"))
    return found
