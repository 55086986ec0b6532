"""Hub sharing, offline: checkpoints are read through huggingface_hub's own cache and offline mode.

No network and no hand-written stand-in for huggingface_hub's download code: the tests lay files into a
temporary Hugging Face cache with huggingface_hub's own cache helpers (blobs, snapshots, refs) and then let
``snapshot_download`` resolve them with ``HF_HUB_OFFLINE``. Only the upload's network call in ``push_to_hub`` is
replaced, by one that puts the uploaded folder into that cache as the Hub would serve it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fixtures.svf_models import inputs, rel_error, tied_model, trained

import svftune
from svftune import SVFCheckpointError

hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402
from huggingface_hub.file_download import (  # noqa: E402
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    repo_folder_name,
)

ROOT = Path(__file__).resolve().parents[1]


def put_in_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Lay ``folder``'s files into the HF cache as a download of ``repo_id`` at ``revision`` would; the commit."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    for file in files:
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / file.name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=False)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    return commit


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub")
    result = {}
    for name, seed in (("v1", 1), ("v2", 2)):
        model = trained(tied_model(), seed=seed)
        svftune.save_svf(model, folder / name, metadata={"base_model": "tied-toy"})
        result[name] = (folder / name, model(inputs()).detach())
    return result


def test_load_by_repo_id_and_revision_from_the_offline_cache(offline_cache, two_versions):
    put_in_cache(offline_cache, "someone/tied-svf", two_versions["v1"][0], revision="v1")
    put_in_cache(offline_cache, "someone/tied-svf", two_versions["v2"][0], revision="main")
    model = svftune.load_svf(tied_model(), "someone/tied-svf")
    assert rel_error(model(inputs()), two_versions["v2"][1]) <= 1e-5
    model = svftune.load_svf(tied_model(), "someone/tied-svf", revision="v1")
    assert rel_error(model(inputs()), two_versions["v1"][1]) <= 1e-5


def test_fresh_process_with_hf_home_and_offline_env(tmp_path, two_versions):
    """The plain user path: HF_HOME + HF_HUB_OFFLINE set in the environment of a new process."""
    hf_home = tmp_path / "hf_home"
    put_in_cache(hf_home / "hub", "someone/tied-svf", two_versions["v1"][0])
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from fixtures.svf_models import tied_model, inputs
        import svftune
        model = svftune.load_svf(tied_model(), "someone/tied-svf")
        torch.save(model(inputs()).detach(), {str(tmp_path / "out.pt")!r})
        """
    )
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    import torch

    assert rel_error(torch.load(tmp_path / "out.pt", weights_only=True), two_versions["v1"][1]) <= 1e-5


def test_missing_repo_offline_is_a_clear_error(offline_cache):
    model = tied_model()
    with pytest.raises(SVFCheckpointError, match=r"cannot get checkpoint 'someone/absent'.*offline mode"):
        svftune.load_svf(model, "someone/absent")
    assert not svftune.svf_layers(model)


def test_push_to_hub_uploads_checkpoint_and_card(offline_cache, monkeypatch):
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        uploads.append(("create", repo_id, kwargs.get("private")))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploads.append(("upload", repo_id, sorted(p.name for p in folder.iterdir()), kwargs))
        put_in_cache(offline_cache, repo_id, folder)  # what the Hub would then serve
        return hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/1",
            commit_message="m",
            commit_description="",
            oid="1" * 40,
        )

    monkeypatch.setattr(hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hub.HfApi, "upload_folder", upload_folder)
    model = trained(tied_model())
    expected = model(inputs()).detach()
    url = svftune.push_to_hub(model, "me/tied-svf", base_model="tied-toy", metrics={"acc": 0.9}, private=True)
    assert url.endswith("/commit/1")
    assert uploads[0] == ("create", "me/tied-svf", True)
    files = uploads[1][2]
    assert files[:2] == ["README.md", "svf_config.json"] and files[2].startswith("svf_model-")
    snapshot = Path(hub.snapshot_download("me/tied-svf"))
    card = (snapshot / "README.md").read_text()
    assert "base_model: tied-toy" in card and "| acc | 0.9 |" in card and "Trainable singular values: 101" in card
    loaded = svftune.load_svf(tied_model(), "me/tied-svf")
    assert rel_error(loaded(inputs()), expected) <= 1e-5


def test_missing_huggingface_hub_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'svftune\[hub\]'"):
        svftune.read_svf("someone/tied-svf")
    with pytest.raises(ImportError, match="huggingface_hub"):
        svftune.push_to_hub(trained(tied_model()), "me/x")
