"""Checkpoint format 2: digests, explicit layout, the schema of every field, bounded reads, concurrent writers."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fixtures.svf_files import join, meta_of, split, with_meta
from fixtures.svf_models import inputs, tied_model, trained

import svftune
from svftune import _io
from svftune.checkpoint import CONFIG_NAME, FORMAT_VERSION, SVFCheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmt")
    model = trained(tied_model())
    file = svftune.save_svf(model, folder / "c.safetensors", metadata={"base_model": "tied-toy"})
    return {"model": model, "expected": model(inputs()).detach(), "file": file, "bytes": file.read_bytes()}


def load_outputs(path: Path) -> torch.Tensor:
    return svftune.load_svf(tied_model(), path)(inputs()).detach()


def test_writers_write_format_2_with_digests_and_slices(saved):
    meta = meta_of(saved["bytes"])
    assert meta["format_version"] == FORMAT_VERSION == 2
    tensors = svftune.read_svf(saved["file"])
    assert set(meta["digests"]) == {"delta_S", *(k for k in split(saved["bytes"])[0] if k != "__metadata__")}
    offsets = [entry["delta_S"] for entry in meta["layers"].values()]
    assert offsets[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(offsets))
    assert [e.offset for e in tensors.layers.values()] == [o[0] for o in offsets]


@pytest.mark.parametrize("style", ["sorted", "indented", "reversed"])
def test_reserialised_metadata_loads_exactly(saved, tmp_path, style):
    """jq -S, pretty-printers, Hub UI edits: other key order and spacing must not move any value."""
    meta = meta_of(saved["bytes"])
    if style == "reversed":
        meta["layers"] = dict(reversed(list(meta["layers"].items())))
        text = json.dumps(meta)
    else:
        text = json.dumps(meta, sort_keys=True, indent=2 if style == "indented" else None)
    path = tmp_path / "c.safetensors"
    path.write_bytes(with_meta(saved["bytes"], None, text=text))
    assert torch.equal(load_outputs(path), load_outputs(saved["file"]))
    assert list(svftune.read_svf(path).layers) == list(meta_of(saved["bytes"])["layers"])  # model order again


def test_a_flipped_data_byte_names_the_tensor(saved, tmp_path):
    header, body = split(saved["bytes"])
    start, _ = header["tie_U/5"]["data_offsets"]
    body = bytearray(body)
    body[start + 3] ^= 0x01
    path = tmp_path / "c.safetensors"
    path.write_bytes(join(header, bytes(body)))
    with pytest.raises(SVFCheckpointError, match="tensor tie_U/5 does not match its sha256"):
        svftune.read_svf(path)


def test_swapped_offsets_of_same_size_tensors_are_caught(tmp_path):
    torch.manual_seed(0)
    model = svftune.apply_svf(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), train="US")
    path = svftune.save_svf(model, tmp_path / "c.safetensors")
    header, body = split(path.read_bytes())
    assert header["U/0"]["shape"] == header["U/1"]["shape"]
    header["U/0"]["data_offsets"], header["U/1"]["data_offsets"] = (
        header["U/1"]["data_offsets"],
        header["U/0"]["data_offsets"],
    )
    path.write_bytes(join(header, body))
    with pytest.raises(SVFCheckpointError, match=r"tensor U/[01] does not match its sha256"):
        svftune.read_svf(path)


FIELDS = {  # edit of the metadata -> the field the message must name
    "format_version": (lambda m: m.update(format_version="2"), "format_version"),
    "svftune_version": (lambda m: m.update(svftune_version=["x"]), "svftune_version"),
    "tie_rtol": (lambda m: m.update(tie_rtol=2.0), "tie_rtol"),
    "config": (lambda m: m.update(config=[1]), "config"),
    "freeze_bn": (lambda m: m["config"].update(freeze_bn=1), "config.freeze_bn"),
    "tied": (lambda m: m["config"].update(tied=True), "config.tied"),
    "config-unknown": (lambda m: m["config"].update(rank=4), r"config\.rank should be absent"),
    "config-missing": (lambda m: m["config"].pop("freeze_others"), r"config\.freeze_others should be a bool \(the"),
    "kind-list": (lambda m: m["layers"]["0"].update(kind=["Conv2d"]), r"layers\['0'\].kind"),
    "dtype-list": (lambda m: m["layers"]["0"].update(dtype=["float32"]), r"layers\['0'\].dtype"),
    "shape": (lambda m: m["layers"]["0"].update(shape=[8, 3, 3]), r"layers\['0'\].shape"),
    "groups": (lambda m: m["layers"]["7"].update(groups=3), r"layers\['7'\].shape/groups"),
    "fro": (lambda m: m["layers"]["0"].update(fro=-1.0), r"layers\['0'\].fro"),
    "sketch": (lambda m: m["layers"]["0"].update(sketch=[1, 2]), r"layers\['0'\].sketch"),
    "ties-overlap": (lambda m: m["layers"]["10"]["ties"].insert(1, m["layers"]["10"]["ties"][0]), "ties"),
    "delta-length": (lambda m: m["layers"]["0"].update(delta_S=[0, 7]), r"layers\['0'\].delta_S"),
    "delta-overlap": (lambda m: m["layers"]["1"].update(delta_S=[0, 12]), "delta_S"),
    "delta-type": (lambda m: m["layers"]["1"].update(delta_S="0:12"), r"layers\['1'\].delta_S"),
    "unknown-layer-field": (lambda m: m["layers"]["1"].update(evil=1), r"layers\['1'\].evil"),
    "unknown-field": (lambda m: m.update(evil=1), "evil"),
    "digest-hex": (lambda m: m["digests"].update(delta_S="00"), "digests"),
    "digest-missing": (lambda m: m["digests"].pop("delta_S"), "digests"),
    "extra": (lambda m: m.update(extra={"w": {"shape": [2], "dtype": 5}}), "extra"),
    "user": (lambda m: m.update(user="x"), "user"),
}


@pytest.mark.parametrize("case", list(FIELDS))
def test_every_wrong_field_is_named(saved, tmp_path, case):
    edit, field = FIELDS[case]
    meta = meta_of(saved["bytes"])
    edit(meta)
    path = tmp_path / "c.safetensors"
    path.write_bytes(with_meta(saved["bytes"], meta))
    model = tied_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SVFCheckpointError, match=field):
        svftune.load_svf(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "svftune.svf_checkpoint", "format_version": 1' + ", " + "9" * 5000 + "}", "not valid JSON"),
        ("[" * 5000 + "]" * 5000, "nested deeper"),
        ('{"format": "svftune.svf_checkpoint", "format": "x"}', "duplicate key"),
        ('{"a": NaN}', "NaN"),
        ('{"a": 1e999}', "not valid JSON"),
        ('{"a": "\\ud800"}', "UTF-8"),
    ],
    ids=["huge-int", "deep", "duplicate", "nan", "overflow", "surrogate"],
)
def test_hostile_json_never_escapes(saved, tmp_path, text, message):
    path = tmp_path / "c.safetensors"
    path.write_bytes(with_meta(saved["bytes"], None, text=text))
    with pytest.raises(SVFCheckpointError, match=message):
        svftune.read_svf(path)
    directory = tmp_path / "d"
    svftune.save_svf(saved["model"], directory)
    (directory / CONFIG_NAME).write_text(text)
    with pytest.raises(SVFCheckpointError, match=message):
        svftune.read_svf(directory)
    (directory / CONFIG_NAME).write_bytes(b'{"a": "\xff"}')
    with pytest.raises(SVFCheckpointError, match="UTF-8"):
        svftune.read_svf(directory)


def test_foreign_file_is_named_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "f.safetensors"
    path.write_bytes(_io.safetensors_bytes({"encoder.weight": torch.ones(3), "b": torch.zeros(2)}))
    monkeypatch.setattr(svftune.checkpoint.read, "read_tensor", lambda *a: pytest.fail("a tensor was materialised"))
    with pytest.raises(SVFCheckpointError, match=r"not an svftune checkpoint \(it holds 2 tensors: b, encoder.weight"):
        svftune.read_svf(path)


def test_the_format_1_writer_layout_still_reads(saved, tmp_path):
    """A v1 file (no digests, slices in key order) reads as before; the committed fixture is tested separately."""
    meta = meta_of(saved["bytes"])
    meta["format_version"] = 1
    meta.pop("digests")
    for entry in meta["layers"].values():
        entry.pop("delta_S")
        entry.setdefault("ties", [])  # format 1 always wrote the list
    path = tmp_path / "v1.safetensors"
    path.write_bytes(with_meta(saved["bytes"], meta))
    assert torch.equal(load_outputs(path), load_outputs(saved["file"]))


# ------------------------------------------------------------------------------------------ bounded reading
ATTACKS = textwrap.dedent(
    """
    import json, os, sys, time, tracemalloc
    sys.path.insert(0, sys.argv[2])
    import svftune, torch
    from svftune import _io
    folder = sys.argv[1]
    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    def attack(name, make):
        path = os.path.join(folder, name)
        make(path)
        try:
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS
            resettable = True
        except OSError:
            resettable = False
        base = rss("VmRSS:")
        start = time.perf_counter()
        try:
            svftune.read_svf(path)
            outcome = "accepted"
        except svftune.SVFCheckpointError as err:
            outcome = "refused: " + str(err)[:100]
        seconds = time.perf_counter() - start
        tracemalloc.start()  # a second run for the Python allocations (tracemalloc slows the run down)
        try:
            svftune.read_svf(path)
        except svftune.SVFCheckpointError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        extra = max(peak, rss("VmHWM:") - base if resettable else 0)
        print(json.dumps({"name": name, "outcome": outcome, "seconds": seconds, "extra_mb": extra / 2**20}))
    def sparse(path, size, head):
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(size)
    GiB = 1 << 30
    attack("huge-header-length.safetensors", lambda p: sparse(p, GiB // 2, (10 * GiB).to_bytes(8, "little")))
    def big_config(p):
        os.mkdir(p)
        sparse(os.path.join(p, "svf_config.json"), GiB // 2, b'{"format": "svftune.svf_checkpoint", "x": "')
    attack("big-config", big_config)
    def foreign(p):
        head = json.dumps({"w": {"dtype": "F32", "shape": [GiB // 8], "data_offsets": [0, GiB // 2]}}).encode()
        sparse(p, 8 + len(head) + GiB // 2, len(head).to_bytes(8, "little") + head)
    attack("foreign-512MiB.safetensors", foreign)
    def empties(p):
        entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(150000))
        head = ("{" + entries + "}").encode()
        with open(p, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
    attack("150k-empty-tensors.safetensors", empties)
    def many(p):
        entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(20000))
        head = ("{" + entries + "}").encode()
        with open(p, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
    attack("20k-empty-tensors.safetensors", many)
    def digest_bomb(p):  # a consistent-looking header over 256 MiB of data whose digest is wrong
        meta = {"format": "svftune.svf_checkpoint", "format_version": 2}
        head = json.dumps({"__metadata__": {"format": "svftune.svf_checkpoint", "svftune": json.dumps(meta)},
                           "delta_S": {"dtype": "F32", "shape": [GiB // 16], "data_offsets": [0, GiB // 4]}}).encode()
        sparse(p, 8 + len(head) + GiB // 4, len(head).to_bytes(8, "little") + head)
    attack("bad-metadata-256MiB.safetensors", digest_bomb)
    """
)


@pytest.mark.slow
def test_hostile_files_are_refused_fast_and_cheaply(tmp_path):
    """Size attacks: refused within 1 s and 50 MB of extra memory each (peak RSS and tracemalloc), in a fresh
    process; the files are sparse, so they cost no disk."""
    script = tmp_path / "attacks.py"
    script.write_text(ATTACKS)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(ROOT / "tests")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == 6
    for report in reports:
        assert report["outcome"].startswith("refused"), report
        assert report["seconds"] < 1.0 and report["extra_mb"] < 50, report


# ------------------------------------------------------------------------------------------ writers
def test_save_into_a_missing_folder_names_the_path(saved, tmp_path):
    target = tmp_path / "no" / "such" / "c.safetensors"
    with pytest.raises(FileNotFoundError, match=str(target).replace(".", r"\.")) as info:
        svftune.save_svf(saved["model"], target)
    assert ".tmp" not in str(info.value) and not (tmp_path / "no").exists()


@pytest.mark.parametrize("form", ["c.safetensors", "c_dir"])
def test_a_killed_saves_leftovers_are_removed_by_the_next_save(saved, tmp_path, form):
    target = tmp_path / form
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from fixtures.svf_models import tied_model, trained
        import svftune
        os.replace = lambda src, dst: os._exit(3)  # killed at its first rename: its temporary file stays
        svftune.save_svf(trained(tied_model(), seed=9), {str(target)!r})
        """
    )
    if form == "c_dir":
        svftune.save_svf(saved["model"], target)
    assert subprocess.run([sys.executable, "-c", script], timeout=300).returncode == 3
    folder = target if form == "c_dir" else tmp_path
    assert [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # the killed save left one
    svftune.save_svf(saved["model"], target)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".lock")]
    assert torch.equal(load_outputs(target), load_outputs(saved["file"]))


RACE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from fixtures.svf_models import tied_model, trained
    import svftune
    model = trained(tied_model(), seed=int(sys.argv[2]))
    for _ in range(int(sys.argv[3])):
        for target in sys.argv[4:]:
            svftune.save_svf(model, target)
    """
)


@pytest.mark.slow
def test_concurrent_writers_leave_one_complete_checkpoint(tmp_path):
    """Three processes save different checkpoints to the same file and directory at once, several times; the
    result is always one of them, complete (and, while they race, readers never see a broken one)."""
    targets = [str(tmp_path / "race.safetensors"), str(tmp_path / "race_dir")]
    seeds = [11, 12, 13]
    expected = {seed: trained(tied_model(), seed=seed)(inputs()).detach() for seed in seeds}
    writers = [
        subprocess.Popen([sys.executable, "-c", RACE, str(ROOT / "tests"), str(seed), "6", *targets]) for seed in seeds
    ]
    seen = 0
    while any(w.poll() is None for w in writers):
        for target in targets:
            if os.path.exists(os.path.join(target, CONFIG_NAME) if target.endswith("_dir") else target):
                out = load_outputs(Path(target))
                assert any(torch.allclose(out, e, rtol=0, atol=1e-5) for e in expected.values())
                seen += 1
    assert all(w.wait(timeout=300) == 0 for w in writers)
    for target in targets:
        out = load_outputs(Path(target))
        assert any(torch.allclose(out, e, rtol=0, atol=1e-5) for e in expected.values())
    names = sorted(p.name for p in Path(targets[1]).iterdir())
    assert len(names) == 3 and names[:2] == ["README.md", CONFIG_NAME], names
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".lock"))]


# ------------------------------------------------------------------------------------------ modules_to_save
def _head_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(128, 3)
    ).eval()


@pytest.mark.parametrize("form", ["m.safetensors", "m_dir"])
def test_modules_to_save_are_stored_whole_and_loaded(tmp_path, form):
    model = svftune.apply_svf(_head_model(), layers=["0"], modules_to_save=["1", "4"])
    with torch.no_grad():
        model[0].S.mul_(1.1)
        model[4].weight.mul_(-2)
        model[1].running_mean.add_(0.5)
        model[1].weight.add_(0.25)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    expected = model.eval()(x)
    path = svftune.save_svf(model, tmp_path / form)
    checkpoint = svftune.read_svf(path)
    assert set(checkpoint.modules) == {"1", "4"} and "running_mean" in checkpoint.modules["1"]
    assert not checkpoint.extra  # their parameters are not stored twice
    assert set(checkpoint.metadata["digests"]) >= {"module/1/running_mean", "module/4/weight"}
    loaded = svftune.load_svf(_head_model(), path).eval()
    assert torch.equal(loaded(x), expected)
    assert loaded[4].weight.requires_grad and loaded.svf_config.modules_to_save == ["1", "4"]

    other = torch.nn.Sequential(*list(_head_model())[:4])  # no head
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(SVFCheckpointError, match="4: module saved whole"):
        svftune.load_svf(other, path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
