"""Share checkpoints through the Hugging Face Hub (``pip install huggingface_hub``, an optional dependency).

``push_to_hub`` saves the checkpoint directory (``svf_config.json``, weights, README model card) and uploads it;
``load_svf(model, "user/repo", revision=...)`` downloads it through huggingface_hub, so its cache, offline mode
(``HF_HUB_OFFLINE=1``) and token handling all apply.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint.format import CARD_NAME, CONFIG_NAME, WEIGHTS_PREFIX
from .checkpoint.save import save_svf
from .errors import SVFCheckpointError

_PATTERNS = [CONFIG_NAME, CARD_NAME, f"{WEIGHTS_PREFIX}-*.safetensors"]


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            "sharing checkpoints through the Hugging Face Hub needs huggingface_hub: pip install 'svftune[hub]' "
            "(or pip install huggingface_hub)"
        ) from None
    return huggingface_hub


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> str:
    """Download the checkpoint in Hub repo ``repo_id`` (or find it in huggingface_hub's cache).

    Only the checkpoint's own files are fetched: ``svf_config.json``, ``README.md`` and the weights.

    Args:
        repo_id: ``"user/name"``.
        revision: branch, tag or commit (default: the main branch).
        cache_dir: huggingface_hub's cache directory (default: its own).

    Returns:
        The local directory holding the checkpoint.

    Raises:
        SVFCheckpointError: the download fails (network, authentication, missing repo or revision, offline
            cache miss).
        ImportError: ``huggingface_hub`` is not installed.
    """
    hub = _hub()
    try:
        return hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=_PATTERNS)
    except Exception as err:  # network, authentication, missing repo or revision, offline cache miss
        offline = " (offline mode: it is not in the local cache)" if hub.is_offline_mode() else ""
        raise SVFCheckpointError(
            f"cannot get checkpoint {repo_id!r}{f' at revision {revision!r}' if revision else ''} from the Hugging "
            f"Face Hub{offline}: {type(err).__name__}: {err}. (No local file or directory of that name exists either.)"
        ) from None


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    base_model: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload SVF checkpoint",
) -> str:
    """Save the model's SVF checkpoint with a model card and upload it to Hub repo ``repo_id``.

    The checkpoint is saved as a directory (``svf_config.json``, weights, ``README.md`` model card; see
    ``save_svf``) and uploaded as one commit, which also removes the weights of a previous upload. The repository
    is created when it does not exist. Load it back with ``svftune.load_svf(model, repo_id)``.

    Args:
        model: a model with SVF applied.
        repo_id: the Hub repository, ``"user/name"``.
        base_model: the base model's name or Hub id (shown on the card, recorded in the metadata).
        metrics: optional evaluation results for the card, e.g. ``{"mIoU (5-shot)": 0.61}``.
        metadata: extra JSON-able information kept in the checkpoint, as for ``save_svf``.
        dtype: storage dtype of the values, as for ``save_svf``.
        private: visibility of a repository created by this call (``None``: the Hub's default).
        token: Hub access token (default: huggingface_hub's stored login).
        revision: branch to commit to (default: the main branch).
        commit_message: the commit's message.

    Returns:
        The URL of the commit.

    Raises:
        ImportError: ``huggingface_hub`` is not installed.
        SVFCheckpointError: the model cannot be saved (see ``save_svf``).

    Errors of the upload itself (authentication, network, permissions) come from huggingface_hub unchanged.
    """
    hub = _hub()
    user = dict(metadata or {})
    if base_model is not None:
        user["base_model"] = base_model
    if metrics is not None:
        user["metrics"] = dict(metrics)
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="svftune-push-") as folder:
        save_svf(model, folder, dtype=dtype, metadata=user)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            delete_patterns=[f"{WEIGHTS_PREFIX}-*.safetensors"],  # the previous upload's weights
        )
    return str(getattr(commit, "commit_url", commit))
