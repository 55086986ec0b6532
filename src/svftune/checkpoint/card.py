"""The README.md model card of a checkpoint directory (what the Hugging Face Hub shows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
    lines.append(f"- svftune {meta.get('svftune_version', 'unknown')}, format {meta['format_version']}")
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
