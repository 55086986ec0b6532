"""svftune and PEFT (LoRA) on one model, in both orders, against the real peft package: SVF on the MLPs of a tiny
Llama, LoRA on its attention projections. Each order trains both, saves both (``save_svf`` + PEFT's
``save_pretrained``), reloads both onto a fresh base and merges both (``merge_and_unload`` then ``merge_svf``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from checks import relative_error
from torch import nn

import svftune

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RTOL_MERGE = 1e-5


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=100, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _lora() -> peft.LoraConfig:
    return peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


TOKENS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


def _train(model: nn.Module) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    for _ in range(2):
        loss = model(input_ids=TOKENS).logits.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _check_trains_both(model: nn.Module) -> None:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith(".S") for n in names) and any("lora_" in n for n in names), names
    assert all(n.endswith(".S") or "lora_" in n for n in names), names
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train(model)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in before.items()), "every trainable tensor moved"


def test_svf_first_then_peft(tmp_path):
    model = svftune.apply_svf(_llama(), layers=["mlp"])
    peft_model = peft.get_peft_model(model, _lora())
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if n.endswith(".S")), "PEFT froze S"
    assert svftune.enable_svf_training(peft_model) == 6
    _check_trains_both(peft_model)
    trained = _logits(peft_model)

    path = svftune.save_svf(peft_model.get_base_model(), tmp_path / "svf.safetensors")
    assert not svftune.read_svf(path).extra, "LoRA's weights are PEFT's to save"
    peft_model.save_pretrained(tmp_path / "lora")
    fresh = _llama()
    svftune.load_svf(fresh, tmp_path / "svf.safetensors")
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "lora")
    assert torch.equal(_logits(reloaded), trained)

    merged = svftune.merge_svf(reloaded.merge_and_unload())
    assert not svftune.svf_layers(merged) and type(merged.model.layers[0].mlp.up_proj) is nn.Linear
    assert relative_error(_logits(merged), trained) <= RTOL_MERGE


def test_peft_first_then_svf(tmp_path):
    peft_model = peft.get_peft_model(_llama(), _lora())
    with pytest.warns(
        svftune.SVFSelectionWarning, match=r"left out 4 layers that a PEFT adapter owns .*self_attn\.q_proj, "
    ):
        svftune.select_layers(peft_model)  # the default passes over LoRA's layers, and says so
    svftune.apply_svf(peft_model, layers=["mlp"])  # default freeze_others=True keeps LoRA trainable
    _check_trains_both(peft_model)
    trained = _logits(peft_model)

    path = svftune.save_svf(peft_model, tmp_path / "svf.safetensors")  # LoRA: PEFT saves it
    assert not svftune.read_svf(path).extra, "LoRA's weights are PEFT's to save"
    peft_model.save_pretrained(tmp_path / "lora")
    fresh = peft.PeftModel.from_pretrained(_llama(), tmp_path / "lora", is_trainable=True)
    svftune.load_svf(fresh, tmp_path / "svf.safetensors")
    assert torch.equal(_logits(fresh), trained)
    assert any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n), "LoRA still trains"

    inner = fresh.merge_and_unload()  # LoRA merged: the transformers model, with its SVF layers
    with pytest.warns(svftune.SVFSaveWarning):  # its save_pretrained writes plain keys, though SVF came via PEFT
        inner.save_pretrained(tmp_path / "merged")
    reloaded = type(inner).from_pretrained(tmp_path / "merged")
    assert relative_error(_logits(reloaded), trained) <= RTOL_MERGE
    merged = svftune.merge_svf(inner)
    assert not svftune.svf_layers(merged) and not any("lora_" in n for n, _ in merged.named_parameters())
    assert relative_error(_logits(merged), trained) <= RTOL_MERGE


def test_save_svf_leaves_peft_parameters_to_peft(tmp_path):
    """include_trainable=True (the default) stores the trainable parameters that are the base model's own, and
    none of PEFT's (LoRA layers, modules_to_save copies), which PEFT's save_pretrained saves."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft_model = peft.get_peft_model(_llama(), config)
    svftune.apply_svf(peft_model, layers=["mlp"])
    norm = "base_model.model.model.norm.weight"
    peft_model.get_parameter(norm).requires_grad_(True)  # the user trains one base parameter fully
    owned = [n for n, p in peft_model.named_parameters() if p.requires_grad and ("lora_" in n or "modules_to" in n)]
    assert owned, "PEFT's own parameters train"
    _train(peft_model)
    trained = _logits(peft_model)

    path = svftune.save_svf(peft_model, tmp_path / "svf.safetensors")
    assert list(svftune.read_svf(path).extra) == [norm]
    peft_model.save_pretrained(tmp_path / "lora")
    fresh = peft.PeftModel.from_pretrained(_llama(), tmp_path / "lora", is_trainable=True)
    svftune.load_svf(fresh, path)
    assert torch.equal(_logits(fresh), trained)


def test_merge_adapter_round_trip_and_base_model():
    model = svftune.apply_svf(_llama(), layers=["mlp"])
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            layer.S.mul_(1.1)
    tuned = _logits(model)
    layers = dict(svftune.svf_layers(model))
    svftune.merge_adapter(model)
    assert not svftune.svf_layers(model)
    assert relative_error(_logits(model), tuned) <= RTOL_MERGE
    svftune.unmerge_adapter(model)
    assert dict(svftune.svf_layers(model)) == layers and torch.equal(_logits(model), tuned)
    base = svftune.get_base_model(model)
    assert torch.equal(_logits(base), _logits(_llama()))
    assert svftune.svf_layers(model), "get_base_model leaves the model adapted"
    with pytest.raises(ValueError, match="no SVF layers"):
        svftune.merge_svf(copy.deepcopy(base))
