"""Checkpoints of Hugging Face transformers models: GPT-2's tied head kept tied through save_svf / load_svf, and
transformers' ``Conv1D`` found when transformers is imported after svftune. Tiny config, random weights, no
downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures.svf_files import meta_of, with_meta

import svftune

transformers = pytest.importorskip("transformers")

VOCAB = 100


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


def _trained_tied(base: torch.nn.Module) -> torch.nn.Module:
    """GPT-2 adapted with ``tied="keep"`` (every projection and the tied ``lm_head``), one optimizer step."""
    model = svftune.apply_svf(copy.deepcopy(base), tied="keep")
    assert "lm_head" in dict(svftune.svf_layers(model))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    tokens = _tokens(1)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    return model.eval()


def _tie_intact(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=tokens)  # the embedding reads the head's effective weight at each forward
    head, embedding = model.lm_head, model.transformer.wte
    assert torch.equal(embedding.weight, head.weight), "lm_head and wte see the same values"
    assert not torch.equal(head.weight, head.base_weight), "the shared weight trained"


@pytest.mark.parametrize("form", ["file", "directory"])
def test_gpt2_tied_head_saved_and_loaded_onto_a_fresh_base(tmp_path, form):
    base = _gpt2()
    model = _trained_tied(base)
    tokens = _tokens(2)
    with torch.no_grad():
        tuned = model(input_ids=tokens).logits
    _tie_intact(model, tokens)
    path = svftune.save_svf(model, tmp_path / ("svf.safetensors" if form == "file" else "svf"))
    assert svftune.read_svf(path).config["tied"] == "keep"

    loaded = svftune.load_svf(copy.deepcopy(base), path).eval()
    assert loaded.svf_config.tied == "keep"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, tuned)
    _tie_intact(loaded, tokens)
    merged = svftune.merge_svf(loaded)
    assert merged.lm_head.weight is merged.transformer.wte.weight, "merge keeps the tie"


def test_tied_absent_means_error_and_wrong_value_is_named(tmp_path):
    """Format 2 files written before ``tied`` was stored have no key: apply_svf's default ("error") applies."""
    base = _gpt2()
    untied = svftune.apply_svf(copy.deepcopy(base), exclude=["lm_head"])
    path = svftune.save_svf(untied, tmp_path / "svf.safetensors")
    data = path.read_bytes()
    meta = meta_of(data)
    assert meta["config"]["tied"] == "error"
    del meta["config"]["tied"]
    (tmp_path / "old.safetensors").write_bytes(with_meta(data, meta))
    loaded = svftune.load_svf(copy.deepcopy(base), tmp_path / "old.safetensors")
    assert loaded.svf_config.tied == "error"

    tied = _trained_tied(base)
    path = svftune.save_svf(tied, tmp_path / "tied.safetensors")
    meta = meta_of(path.read_bytes())
    del meta["config"]["tied"]  # a tied checkpoint without the key: refused with the tie error, model untouched
    (tmp_path / "tied-old.safetensors").write_bytes(with_meta(path.read_bytes(), meta))
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="tied='keep'"):
        svftune.load_svf(fresh, tmp_path / "tied-old.safetensors")
    assert not svftune.svf_layers(fresh) and fresh.lm_head.weight is fresh.transformer.wte.weight

    meta["config"]["tied"] = "untie"
    (tmp_path / "bad.safetensors").write_bytes(with_meta(path.read_bytes(), meta))
    named = r"config\.tied should be a valid value \(tied='untie' is not valid: choose 'error'"
    with pytest.raises(svftune.SVFCheckpointError, match=named):
        svftune.read_svf(tmp_path / "bad.safetensors")


def test_cli_rebuilds_a_conv1d_base_layer_when_transformers_came_after_svftune():
    """``svftune merge``/``diff`` rebuild plain layers by kind; Conv1D resolves at use time, weight kept (in, out)."""
    import subprocess
    import sys

    code = (
        "import torch, svftune\n"
        "from svftune.cli import _layer_around\n"
        "from transformers.pytorch_utils import Conv1D\n"  # imported after svftune
        "torch.manual_seed(0)\n"
        "ref = Conv1D(6, 4)\n"
        "layer = _layer_around('Conv1D', ref.weight.detach(), 1, ref.bias.detach())\n"
        "x = torch.randn(3, 4)\n"
        "assert type(layer) is Conv1D and layer.weight.shape == (4, 6)\n"
        "assert torch.equal(layer(x), ref(x))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
