"""Every public name has a docstring: svftune's ``__all__``, the public members of its public classes, its modules,
and the public top-level functions and classes of the svf_fss example package.

A docstring is the name's own (``obj.__doc__``), not one inherited from torch: the API reference (mkdocstrings)
renders only what the name itself says.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator

import pytest

import svftune

#: Public svftune names allowed to lack a docstring: none. (An entry here makes the test fail once the name gains a
#: docstring, so such a list can only shrink.)
KNOWN_MISSING: set[str] = set()

#: svf_fss functions without a docstring (the example package is documented separately). Same rule as above.
FSS_KNOWN_MISSING = {"svf_fss.cli.build_parser"}


def _has_doc(obj: object) -> bool:
    doc = obj.__doc__ if isinstance(obj, (type, property)) or callable(obj) else None
    return bool(doc and doc.strip())


def _class_doc(cls: type) -> str:
    """The class's own docstring; dataclasses without one get a generated signature, which does not count."""
    doc = cls.__dict__.get("__doc__") or ""
    if dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}("):
        return ""
    return doc.strip()


def _modules(package: object) -> Iterator[object]:
    yield package
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        try:
            yield importlib.import_module(info.name)
        except ImportError as err:  # a module whose optional dependency is missing documents nothing here
            if err.name is None or err.name.split(".")[0] == package.__name__:
                raise


def _members(cls: type) -> Iterator[tuple[str, object]]:
    """Public methods and properties that ``cls`` or one of its svftune bases defines."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    seen = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("svftune"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in seen or name in fields:
                continue
            seen.add(name)
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property) or inspect.isfunction(value):
                yield f"{klass.__name__}.{name}", value


def _documented_fields(cls: type) -> set[str]:
    """Names listed in the ``Attributes:`` section of a class docstring (Google style)."""
    doc = inspect.cleandoc(_class_doc(cls))
    match = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)+)", doc, re.MULTILINE)
    if not match:
        return set()
    return set(re.findall(r"^[ \t]{4}(\w+)(?: \([^)]*\))?:", match.group(1), re.MULTILINE))


def svftune_offenders() -> list[str]:
    offenders = []
    for module in _modules(svftune):
        if not (module.__doc__ or "").strip():
            offenders.append(f"module {module.__name__}")
    classes = []
    for name in svftune.__all__:
        obj = getattr(svftune, name)
        if name == "__version__":
            continue
        if inspect.isclass(obj):
            classes.append(obj)
            if not _class_doc(obj):
                offenders.append(f"svftune.{name}")
        elif not _has_doc(obj):
            offenders.append(f"svftune.{name}")
    # Classes that public functions return or take are part of the API too.
    from svftune.checkpoint import LayerEntry, LoadPlan

    classes += [LayerEntry, LoadPlan]
    for cls in classes:
        for qualified, member in _members(cls):
            if not _has_doc(member):
                offenders.append(f"svftune.{qualified}")
        if dataclasses.is_dataclass(cls):
            documented = _documented_fields(cls)
            for field in dataclasses.fields(cls):
                if field.name not in documented:
                    offenders.append(f"svftune.{cls.__name__}.{field.name} (not in the Attributes: section)")
    return sorted(set(offenders))


def fss_offenders() -> list[str]:
    svf_fss = pytest.importorskip("svf_fss")
    offenders = []
    for module in _modules(svf_fss):
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if obj.__module__ != module.__name__:  # imported from elsewhere
                continue
            doc = _class_doc(obj) if inspect.isclass(obj) else (obj.__doc__ or "").strip()
            if not doc:
                offenders.append(f"{module.__name__}.{name}")
    return sorted(offenders)


def _check(offenders: list[str], known: set[str]) -> None:
    new = [name for name in offenders if name not in known]
    fixed = sorted(known - set(offenders))
    message = []
    if new:
        message.append("public names without a docstring:\n  " + "\n  ".join(new))
    if fixed:
        message.append("documented now, remove from the known-missing list:\n  " + "\n  ".join(fixed))
    assert not message, "\n".join(message)


def test_svftune_public_names_have_docstrings():
    _check(svftune_offenders(), KNOWN_MISSING)


def test_svf_fss_public_functions_have_docstrings():
    _check(fss_offenders(), FSS_KNOWN_MISSING)


def test_the_check_finds_a_missing_docstring(monkeypatch):
    def undocumented():
        pass

    monkeypatch.setattr(svftune, "undocumented", undocumented, raising=False)
    monkeypatch.setattr(svftune, "__all__", [*svftune.__all__, "undocumented"])
    assert "svftune.undocumented" in svftune_offenders()
