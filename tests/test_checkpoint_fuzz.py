"""Seeded fuzzing of checkpoint files: every damaged, edited or hostile file either loads exactly or is refused.

The promise checked for every case: ``load_svf`` raises ``SVFCheckpointError`` and the model is byte-identical to
before the call (state dict bytes, module types, ``requires_grad``), or it loads and the outputs are bit-identical
to loading the untouched checkpoint. Nothing else may escape (no other exception, no traceback).

``MUTATIONS`` is a table ``name -> (cases, mutate)``: ``mutate(rng, good_bytes)`` returns the bytes of a
single-file checkpoint. ``DIR_MUTATIONS`` does the same for the directory form (``mutate(rng, folder, other)``
edits a copy in place). Add a row to grow the fuzzer; the seed makes every run the same.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
from fixtures.svf_files import copy_dir, join, meta_of, split, with_meta
from fixtures.svf_models import inputs, tied_model, trained

import svftune
from svftune.checkpoint import CONFIG_NAME, SVFCheckpointError

SEED = 20261201
CODES = ["F16", "BF16", "F32", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X9"]
ODD_VALUES = [None, True, -1, 0, 2**70, 1.5, -0.0, "x", "", [], [1, "a"], {}, {"a": 1}, [[[]]], "9" * 200]


def _walk(value, path=()):
    """Every (path, value) inside a JSON value."""
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _walk(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _walk(child, (*path, i))


def _set(root, path, value):
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def flip_byte(rng, data, low, high):
    body = bytearray(data)
    position = rng.randrange(low, high)
    body[position] ^= 1 << rng.randrange(8)
    return bytes(body)


def header_end(data):
    return 8 + int.from_bytes(data[:8], "little")


def wrong_type(rng, data):
    meta = meta_of(data)
    paths = [p for p, _ in _walk(meta) if p]
    path = rng.choice(paths)
    current = dict(_walk(meta))[path]
    value = rng.choice([v for v in ODD_VALUES if type(v) is not type(current)])
    _set(meta, path, value)
    return with_meta(data, meta)


def edit_tensor_entry(rng, data, field):
    header, body = split(data)
    name = rng.choice([n for n in header if n != "__metadata__"])
    info = header[name]
    if field == "dtype":
        info["dtype"] = rng.choice([c for c in CODES if c != info["dtype"]])
    elif field == "shape":
        shape = list(info["shape"])
        choice = rng.randrange(4)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 7])
        elif choice == 1:
            shape = shape[::-1]
        elif choice == 2:
            shape = [*shape, 1]
        else:
            shape = [math.prod(shape)]  # same size, other shape
        info["shape"] = shape
    else:
        start, end = info["data_offsets"]
        delta = rng.choice([-4, -2, 2, 4, 8, 1 << 40])
        info["data_offsets"] = rng.choice([[start + delta, end + delta], [start, end + delta], [end, start]])
    return join(header, body)


def reserialise(rng, data):
    meta = meta_of(data)
    style = rng.randrange(4)
    if style == 0:
        text = json.dumps(meta, sort_keys=True)
    elif style == 1:
        text = json.dumps(meta, indent=rng.choice([1, 2, 4]), sort_keys=rng.random() < 0.5)
    elif style == 2:
        layers = list(meta["layers"].items())
        rng.shuffle(layers)
        meta["layers"] = dict(layers)
        text = json.dumps(meta, separators=(", ", ": "))
    else:
        header, body = split(data)  # the whole safetensors header re-serialised with sorted keys
        return join(None, body, raw=json.dumps(header, sort_keys=True, indent=1).encode())
    return with_meta(data, None, text=text)


def nan_inf(rng, data):
    header, body = split(data)
    name = rng.choice([n for n in header if n != "__metadata__"])
    start, end = header[name]["data_offsets"]
    size = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[header[name]["dtype"]]
    position = start + size * rng.randrange((end - start) // size)
    special = {2: [b"\x00\x7e", b"\x00\x7c"], 4: [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"]}
    special[8] = [b"\x00" * 6 + b"\xf8\x7f", b"\x00" * 6 + b"\xf0\x7f"]
    if header[name]["dtype"] == "BF16":
        special[2] = [b"\xc0\x7f", b"\x80\x7f"]
    body = bytearray(body)
    body[position : position + size] = rng.choice(special[size])
    spoiled = join(header, bytes(body))
    return with_meta(spoiled, meta_of(spoiled), redigest=True) if rng.random() < 0.5 else spoiled


def swap_entries(rng, data):
    header, body = split(data)
    names = [n for n in header if n != "__metadata__"]
    a, b = rng.sample(names, 2)
    header[a], header[b] = header[b], header[a]
    return join(header, body)


def header_length(rng, data):
    length = int.from_bytes(data[:8], "little")
    value = rng.choice([0, 1, length - 1, length + 1, length + 8, len(data), 2**63 - 1, 2**64 - 1, 10**10])
    return value.to_bytes(8, "little") + data[8:]


MUTATIONS = {
    "flip-header-byte": (80, lambda rng, d: flip_byte(rng, d, 8, header_end(d))),
    "flip-length-byte": (8, lambda rng, d: flip_byte(rng, d, 0, 8)),
    "flip-data-byte": (40, lambda rng, d: flip_byte(rng, d, header_end(d), len(d))),
    "truncate": (25, lambda rng, d: d[: rng.randrange(len(d))]),
    "header-length": (9, header_length),
    "append-garbage": (10, lambda rng, d: d + bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 8, 100])))),
    "wrong-type": (80, wrong_type),
    "edit-dtype": (15, lambda rng, d: edit_tensor_entry(rng, d, "dtype")),
    "edit-shape": (15, lambda rng, d: edit_tensor_entry(rng, d, "shape")),
    "edit-offsets": (15, lambda rng, d: edit_tensor_entry(rng, d, "offsets")),
    "swap-entries": (10, swap_entries),
    "reserialise": (12, reserialise),
    "nan-inf": (15, nan_inf),
}


def _copy_weights_of(folder, other):
    weights = next(folder.glob("svf_model-*"))
    weights.write_bytes(next(other.glob("svf_model-*")).read_bytes())


def _symlink(target, link):
    link.unlink()
    link.symlink_to(target)


DIR_MUTATIONS = {
    "weights-from-other": lambda rng, d, o: _copy_weights_of(d, o),
    "config-from-other": lambda rng, d, o: (d / CONFIG_NAME).write_bytes((o / CONFIG_NAME).read_bytes()),
    "weights-symlink-to-other": lambda rng, d, o: _symlink(next(o.glob("svf_model-*")), next(d.glob("svf_model-*"))),
    "weights-symlink-to-itself": lambda rng, d, o: _symlink(
        next(d.glob("svf_model-*")).name, next(d.glob("svf_model-*"))
    ),
    "weights-symlink-dangling": lambda rng, d, o: _symlink(d / "nowhere", next(d.glob("svf_model-*"))),
    "config-symlink-to-other": lambda rng, d, o: _symlink(o / CONFIG_NAME, d / CONFIG_NAME),
    "config-symlink-to-dev-zero": lambda rng, d, o: _symlink("/dev/zero", d / CONFIG_NAME),
    "config-is-a-directory": lambda rng, d, o: ((d / CONFIG_NAME).unlink(), (d / CONFIG_NAME).mkdir()),
    "weights-is-a-directory": lambda rng, d, o: (
        next(d.glob("svf_model-*")).unlink(),
        (d / json.loads((d / CONFIG_NAME).read_text())["weights"]).mkdir(),
    ),
    "weights-name-escapes": lambda rng, d, o: _edit_config(
        d, weights=f"../{o.name}/" + next(o.glob("svf_model-*")).name
    ),
    "weights-name-absolute": lambda rng, d, o: _edit_config(d, weights=str(next(o.glob("svf_model-*")))),
    "weights-sha-of-other": lambda rng, d, o: (
        _copy_weights_of(d, o),
        _edit_config(d, weights_sha256=json.loads((o / CONFIG_NAME).read_text())["weights_sha256"]),
    ),
    "config-truncated": lambda rng, d, o: (d / CONFIG_NAME).write_bytes((d / CONFIG_NAME).read_bytes()[:-10]),
    "config-flip-byte": lambda rng, d, o: (d / CONFIG_NAME).write_bytes(
        flip_byte(rng, (d / CONFIG_NAME).read_bytes(), 0, (d / CONFIG_NAME).stat().st_size)
    ),
    "config-sorted-keys": lambda rng, d, o: (d / CONFIG_NAME).write_text(
        json.dumps(json.loads((d / CONFIG_NAME).read_text()), sort_keys=True, indent=2)
    ),
    "card-removed": lambda rng, d, o: (d / "README.md").unlink(),
}


def _edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    model = trained(tied_model())
    file = svftune.save_svf(model, folder / "good.safetensors", metadata={"base_model": "tied-toy", "x": [1, 2]})
    directory = svftune.save_svf(model, folder / "good_dir")
    other = svftune.save_svf(trained(tied_model(), seed=5), folder / "other_dir")
    expected = svftune.load_svf(tied_model(), file)(inputs()).detach()
    return {"file": file, "dir": directory, "other": other, "expected": expected, "bytes": file.read_bytes()}


def _check(source, expected) -> str:
    """Load ``source`` onto a fresh base; returns "refused" or "loaded" after checking the promise."""
    model = tied_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "not bit-identical" after an edited base fingerprint
            svftune.load_svf(model, source)
    except SVFCheckpointError:
        assert time.perf_counter() - start < 1.0, f"{source}: slow refusal"
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        assert [(n, type(m)) for n, m in model.named_modules()] == types
        assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
        return "refused"
    with torch.no_grad():
        assert torch.equal(model(inputs()), expected), f"{source}: loaded with other outputs"
    return "loaded"


def test_fuzz_single_file(good, tmp_path):
    rng = random.Random(SEED)
    outcomes: dict[str, dict[str, int]] = {}
    path = tmp_path / "case.safetensors"
    for name, (cases, mutate) in MUTATIONS.items():
        for i in range(cases):
            data = mutate(rng, good["bytes"])
            path.write_bytes(data)
            try:
                outcome = _check(path, good["expected"])
            except AssertionError as err:
                raise AssertionError(f"mutation {name} #{i}: {err}") from None
            outcomes.setdefault(name, {}).setdefault(outcome, 0)
            outcomes[name][outcome] += 1
    total = sum(sum(v.values()) for v in outcomes.values())
    assert total >= 300
    # teeth: the damaging mutations are refused every time, re-serialised metadata always loads exactly
    for name in ("flip-data-byte", "truncate", "append-garbage", "edit-dtype", "edit-offsets", "nan-inf"):
        assert outcomes[name] == {"refused": MUTATIONS[name][0]}, (name, outcomes[name])
    assert outcomes["reserialise"] == {"loaded": MUTATIONS["reserialise"][0]}
    assert outcomes["wrong-type"].get("refused", 0) > 40


def test_fuzz_directory_form(good, tmp_path):
    rng = random.Random(SEED + 1)
    outcomes = {}
    for name, mutate in DIR_MUTATIONS.items():
        folder = copy_dir(good["dir"], tmp_path / name)
        mutate(rng, folder, good["other"])
        try:
            outcomes[name] = _check(folder, good["expected"])
        except AssertionError as err:
            raise AssertionError(f"directory mutation {name}: {err}") from None
    harmless = {"config-sorted-keys", "card-removed", "weights-symlink-to-itself"}
    assert {n for n, o in outcomes.items() if o == "loaded"} <= harmless | {"config-flip-byte"}
    assert all(outcomes[n] == "loaded" for n in ("config-sorted-keys", "card-removed"))


def test_fuzz_size_attacks_are_cheap(good, tmp_path):
    """Lengths and counts far beyond the limits are refused before anything large is read (time only here; the
    memory side is measured in a subprocess by test_checkpoint_format)."""
    header, body = split(good["bytes"])
    cases = {
        "many-tensors": join(
            {**header, **{f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(20000)}}, body
        ),
        "long-header": (len(good["bytes"]) * 1000).to_bytes(8, "little") + good["bytes"][8:],
        "huge-shape": join(
            {**header, "x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 2**82]}}, body
        ),
        "deep-user": with_meta(
            good["bytes"], {**meta_of(good["bytes"]), "user": json.loads('{"a":' * 40 + "1" + "}" * 40)}
        ),
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        start = time.perf_counter()
        with pytest.raises(SVFCheckpointError):
            svftune.read_svf(path)
        assert time.perf_counter() - start < 1.0, name
    assert os.path.getsize(tmp_path / "long-header.safetensors") == len(good["bytes"])
    assert Path(good["file"]).read_bytes() == good["bytes"]
