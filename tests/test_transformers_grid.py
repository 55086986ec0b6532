"""Hugging Face transformers models through the shared SVF checks (checks.py): GPT-2 (transformers' Conv1D, tied
lm_head), BERT, ViT and Llama (tied and untied), tiny configs (2 layers, hidden 32) with random weights, no downloads.

a. eval at init bit-identical to the original; b. a training step changes only S; c. save/load (``state_dict`` into a
fresh adapted model, and ``save_pretrained`` -> ``from_pretrained`` of the plain class, which loads the merged
weights); d. merge (plain classes, weights rounded once, outputs within ``RTOL_MERGE``) and unapply (bit for bit);
e. tied weights are refused by default and stay tied with ``tied="keep"`` through training, merge and unapply.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from checks import check_eval_exact_at_init, check_merge, check_only_s_trains, check_unapply, relative_error
from torch import nn
from toys import perturb_singular_values

import svftune

transformers = pytest.importorskip("transformers")

RTOL_MERGE = 1e-5  # fp32; measured 1e-7 to 4e-7 here
VOCAB = 100


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict]
    tied: bool = False  # the output layer shares the input embedding's weight


def _tokens(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=generator)}


def _pixels(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}


def _gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _bert():
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _vit():
    config = transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4,
        num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def _llama(tied: bool):
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=VOCAB, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


FAMILIES = {
    "gpt2": Family(_gpt2, _tokens, tied=True),
    "bert": Family(_bert, _tokens),
    "vit": Family(_vit, _pixels),
    "llama": Family(lambda: _llama(False), _tokens),
    "llama_tied": Family(lambda: _llama(True), _tokens, tied=True),
}


def _build(family: Family) -> nn.Module:
    torch.manual_seed(0)
    model = family.build().eval()
    with torch.no_grad():  # non-trivial constants: zero biases and unit norm scales get random values
        for parameter in model.parameters():
            if parameter.dim() == 1 and parameter.min() == parameter.max():
                parameter.copy_(torch.randn(parameter.shape) * 0.1 + parameter.flatten()[0])
    next(model.parameters()).requires_grad_(False)  # mixed flags, so that restoring them is not vacuous
    return model


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request):
    family = FAMILIES[request.param]
    original = _build(family)
    adapted = svftune.apply_svf(copy.deepcopy(original), tied="keep")
    return request.param, family, original, adapted


def test_every_projection_adapted_exact_at_init(case):
    name, family, original, adapted = case
    kinds = {type(layer).__name__ for _, layer in svftune.svf_layers(adapted)}
    expected = {"gpt2": {"SVFConv1D", "SVFLinear"}, "vit": {"SVFConv2d", "SVFLinear"}}  # ViT: the patch conv
    assert kinds == expected.get(name, {"SVFLinear"})
    plain = [n for n, m in original.named_modules() if svftune.layers.layer_kind(m) is not None]
    assert sorted(n for n, _ in svftune.svf_layers(adapted)) == sorted(plain)
    check_eval_exact_at_init(original, adapted, family.inputs(1))


def test_training_step_changes_only_singular_values(case):
    _, family, _, adapted = case

    def loss(model, step):
        return _logits(model, family.inputs(10 + step)).float().square().mean()

    model = copy.deepcopy(adapted)
    check_only_s_trains(model, loss, steps=2)
    if family.tied:  # the embedding reads the trained head weight (refreshed at every forward)
        model.eval()
        with torch.no_grad():
            model(**family.inputs(20))
            assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
            assert not torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().base_weight)


def test_state_dict_and_save_pretrained_round_trips(case, tmp_path):
    name, family, original, adapted = case
    model = copy.deepcopy(adapted)
    perturb_singular_values(model, scale=0.1, seed=3)
    x = family.inputs(4)
    with torch.no_grad():
        tuned = _logits(model.eval(), x)
    fresh = svftune.apply_svf(copy.deepcopy(original), tied="keep")
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(_logits(fresh.eval(), x), tuned)
    with pytest.warns(svftune.SVFSaveWarning, match="merged weights"):
        model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = type(original).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        error = relative_error(_logits(reloaded, x), tuned)
    assert error <= RTOL_MERGE, f"{name}: from_pretrained of the saved SVF model is {error:.2e} off"
    if family.tied:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_merge_and_unapply(case):
    _, family, original, adapted = case
    model = copy.deepcopy(adapted)
    perturb_singular_values(model, scale=0.1, seed=5)
    merged = check_merge(model, original, family.inputs(6), RTOL_MERGE)
    check_unapply(model, original, family.inputs(6))
    if family.tied:
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight, "merge keeps the tie"
        restored = svftune.unapply_svf(copy.deepcopy(model))
        assert restored.get_output_embeddings().weight is restored.get_input_embeddings().weight


@pytest.mark.parametrize("name", ["gpt2", "llama_tied"])
def test_tied_weights_refused_by_default(name):
    model = _build(FAMILIES[name])
    head = "lm_head"
    with pytest.raises(
        ValueError, match=r"lm_head\.weight is also .*(wte|embed_tokens)\.weight\n.*exclude=\['lm_head'\].*tied='keep'"
    ):
        svftune.apply_svf(model)
    assert not svftune.svf_layers(model), "nothing applied on error"
    svftune.apply_svf(model, exclude=[head])
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_gpt2_conv1d_selection_and_targets():
    model = _build(FAMILIES["gpt2"])
    conv1d = type(model.transformer.h[0].attn.c_attn)
    names = [n for n, _ in svftune.select_layers(model, ["transformer.h"])]
    assert len(names) == 8 and all(n.startswith("transformer.h.") for n in names)
    assert len(svftune.select_layers(model, targets=[conv1d])) == 8
    assert [n for n, _ in svftune.select_layers(model, ["c_attn"])] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    assert len(svftune.select_layers(model, "all-linear")) == 8, "all-linear leaves the output layer out"
    layer = svftune.svf_layer_from(model.transformer.h[0].mlp.c_fc)
    assert svftune.unapply_svf(nn.Sequential(layer))[0].weight is model.transformer.h[0].mlp.c_fc.weight


def test_peft_style_names_on_llama_and_helpful_errors():
    model = _build(FAMILIES["llama"])
    names = [n for n, _ in svftune.select_layers(model, ["q_proj", "v_proj"])]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert [n for n, _ in svftune.select_layers(model, r".*\.(q_proj|v_proj)")] == names  # a PEFT regex
    with pytest.raises(ValueError, match=r"'q_prj' matches no module of the model \(did you mean 'q_proj'"):
        svftune.select_layers(model, ["q_prj"])
    with pytest.raises(ValueError, match=r"layers=\['q_proj'\] \(PEFT's target_modules list rule\)"):
        svftune.select_layers(model, "q_proj")


class _Projection(nn.Module):
    """A third-party projection layer svftune does not know."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.weight


def test_unsupported_projections_are_named_in_warnings_and_errors():
    model = nn.Sequential(nn.Linear(4, 4), _Projection())
    with pytest.warns(svftune.SVFSelectionWarning, match=r"passed over 1 layers .*: 1 \(_Projection\)"):
        svftune.select_layers(model)
    with pytest.raises(
        ValueError, match=r"matched no layer.*\n.*passed over 1 layers.*\n(.|\n)*1 _Projection \(not supported\)"
    ):
        svftune.select_layers(model, ["1"])
