"""``transformers.Trainer`` on SVF models: a tiny GPT-2 (Conv1D; its tied ``lm_head`` left out, or adapted with
``tied="keep"``) and a tiny BERT classifier (its head trains fully), random weights, CPU, no downloads, a few steps
with a checkpoint every 2.

What a Trainer user relies on: a. training changes ``S`` (and the BERT head) and nothing else; b. every checkpoint
folder loads with ``from_pretrained`` into the plain class, with the outputs of the merged SVF model at that step;
c. ``train(resume_from_checkpoint=...)`` on a freshly adapted model continues the run (the load hook reads the
singular values back from the merged weights: the resumed run ends within ``ATOL_RESUME`` of the uninterrupted
one), ``load_best_model_at_end`` restores the best step, and the cases that cannot be read back fail with an
``SVFCheckpointError`` that says what to do; d. one ``SVFSaveWarning`` per save.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from checks import relative_error
from safetensors.torch import load_file

import svftune

transformers = pytest.importorskip("transformers")

VOCAB = 100
RTOL_OUTPUT = 1e-5  # float32: plain model from a checkpoint vs the unmerged SVF model (measured ~1e-7)
ATOL_READ_BACK = 1e-7  # S read back from float32 merged weights vs S at that step (measured <= 1.5e-8)
ATOL_RESUME = 1e-6  # resumed vs uninterrupted run, after 2 more steps (measured <= 1.5e-8)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Family:
    build: Callable[[int], torch.nn.Module]
    adapt: dict
    auto: str  # the transformers Auto class a user reloads a checkpoint with
    labels: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    left_out: tuple[str, ...] = ()  # keys save_pretrained leaves out of a checkpoint (tied), with or without SVF


def _gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _bert(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


FAMILIES = {
    "gpt2": Family(_gpt2, {"exclude": ["lm_head"]}, "AutoModelForCausalLM", lambda ids, g: ids, ("lm_head.weight",)),
    # the tied head adapted once: checkpoints hold it as transformer.wte.weight, which the load hook reads back
    "gpt2-tied": Family(_gpt2, {"tied": "keep"}, "AutoModelForCausalLM", lambda ids, g: ids),
    "bert": Family(
        _bert,
        {"layers": ["bert.encoder"], "modules_to_save": ["classifier"]},
        "AutoModelForSequenceClassification",
        lambda ids, g: torch.randint(0, 3, (), generator=g),
    ),
}


def _data(family: Family, count: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (16,), generator=generator)
        rows.append({"input_ids": ids, "labels": family.labels(ids, generator)})
    return rows


def _adapted(family: Family, seed: int = 0, **extra) -> torch.nn.Module:
    return svftune.apply_svf(family.build(seed), **{**family.adapt, **extra})


class Record(transformers.TrainerCallback):
    """The model's (SVF) state dict at every checkpoint, taken right after the Trainer wrote it."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trainer(family: Family, model, out, **extra) -> tuple[transformers.Trainer, Record]:
    options = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps",
        save_steps=2, use_cpu=True, report_to="none", seed=0, logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    options.update(extra)
    record = Record()
    data = _data(family)
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**options),
        train_dataset=data,
        eval_dataset=data[:4] if "eval_strategy" in extra else None,
        callbacks=[record],
    )
    return trainer, record


def _probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _logits(model: torch.nn.Module, probe: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=probe).logits


def _at_step(family: Family, state: dict) -> torch.nn.Module:
    model = _adapted(family)
    model.load_state_dict(state)  # SVF keys, strict: exactly the model at that step
    return model


def _s_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.S.detach().clone() for name, layer in svftune.svf_layers(model)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_trainer_checkpoints_reload_plain_and_resume_continues_the_run(tmp_path, name):
    family = FAMILIES[name]
    model = _adapted(family)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = tuple(f"{m}." for m in family.adapt.get("modules_to_save", []))
    assert trains and all(n.endswith(".S") or n.startswith(heads) for n in trains)
    trainer, record = _trainer(family, model, tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
        trainer.save_model(str(tmp_path / "final"))
    saves = [w for w in caught if issubclass(w.category, svftune.SVFSaveWarning)]
    assert len(saves) == 3, "d. one SVFSaveWarning per save: checkpoint-2, checkpoint-4, save_model"
    assert sorted(record.states) == [2, 4]

    # a. S trained (every layer), the head trained, nothing else moved
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if k.endswith(".S")} == {f"{n}.S" for n, _ in svftune.svf_layers(model)}
    assert {k for k in changed if not k.endswith(".S")} == {k for k in before if k.startswith(heads)}

    # b. each folder the Trainer wrote is a plain model with the merged model's outputs at that step
    probe = _probe()
    auto = getattr(transformers, family.auto)
    folders = {2: tmp_path / "run" / "checkpoint-2", 4: tmp_path / "run" / "checkpoint-4", "final": tmp_path / "final"}
    for step, folder in folders.items():
        svf_model = _at_step(family, record.states[4 if step == "final" else step])
        plain = auto.from_pretrained(folder)
        assert type(plain) is type(model) and not svftune.svf_layers(plain)
        expected = _logits(svf_model, probe)
        merged = svftune.merge_svf(copy.deepcopy(svf_model))
        assert torch.equal(_logits(plain, probe), _logits(merged, probe)), step
        assert relative_error(_logits(plain, probe), expected) < RTOL_OUTPUT, step

    # c. the checkpoint's merged weights load into a freshly adapted model as its singular values ...
    fresh = _adapted(family)
    result = fresh.load_state_dict(load_file(folders[2] / "model.safetensors"), strict=False)
    assert result.missing_keys == list(family.left_out) and result.unexpected_keys == []
    at_2 = _at_step(family, record.states[2])
    for layer_name, values in _s_values(fresh).items():
        assert (values - dict(svftune.svf_layers(at_2))[layer_name].S).abs().max() <= ATOL_READ_BACK, layer_name

    # ... so a resumed run on a freshly adapted model ends where the uninterrupted one did
    resumed_model = _adapted(family)
    resumed, _ = _trainer(family, resumed_model, tmp_path / "resumed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svftune.SVFSaveWarning)
        resumed.train(resume_from_checkpoint=str(folders[2]))
    assert resumed.state.global_step == 4
    final = resumed_model.state_dict()
    for key, value in after.items():
        assert (final[key] - value).abs().max() <= ATOL_RESUME, key


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    family = FAMILIES["bert"]
    model = _adapted(family)
    trainer, record = _trainer(
        family, model, tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=True,  # "best" = the higher eval loss: step 2, not the last
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svftune.SVFSaveWarning)
        trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    expected, last = (_s_values(_at_step(family, record.states[step])) for step in (2, 4))
    for layer_name, values in _s_values(model).items():
        assert not torch.equal(expected[layer_name], last[layer_name]), layer_name
        assert (values - expected[layer_name]).abs().max() <= ATOL_READ_BACK, layer_name
    assert torch.equal(model.classifier.weight.detach(), record.states[2]["classifier.weight"])


def test_resume_onto_other_base_weights_fails_with_svftune_error(tmp_path):
    family = FAMILIES["gpt2"]
    trainer, _ = _trainer(family, _adapted(family), tmp_path / "run", max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svftune.SVFSaveWarning)
        trainer.train()
    other = _adapted(family, seed=1)  # another random base: its U diag(s) Vh cannot express the saved weights
    before = _s_values(other)
    resumed, _ = _trainer(family, other, tmp_path / "resumed")
    with pytest.raises(svftune.SVFCheckpointError, match="saved from other base weights"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert all(torch.equal(before[n], s) for n, s in _s_values(other).items()), "nothing was loaded"


class SaveSVF(transformers.TrainerCallback):
    """The documented recipe where merged weights cannot be read back: ``save_svf`` into every checkpoint folder."""

    def on_save(self, args, state, control, model=None, **kwargs):
        svftune.save_svf(model, f"{args.output_dir}/checkpoint-{state.global_step}/svf.safetensors")


def test_merged_weights_that_cannot_be_read_back_fail_and_save_svf_load_svf_resumes(tmp_path):
    """train="US": U changes, so merged weights do not give the SVF values back; loading them fails with an error
    that names save_svf/load_svf. After load_svf the checkpoint's weights are the model's own, and resuming works."""
    family = FAMILIES["gpt2"]
    model = _adapted(family, train="US")
    trainer, _ = _trainer(family, model, tmp_path / "run")
    trainer.add_callback(SaveSVF())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svftune.SVFSaveWarning)
        trainer.train()
    folder = tmp_path / "run" / "checkpoint-2"
    fresh = _adapted(family, train="US")
    before = _s_values(fresh)
    with pytest.raises(svftune.SVFCheckpointError, match=r"train='US'.*svftune\.load_svf"):
        fresh.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert all(torch.equal(before[n], s) for n, s in _s_values(fresh).items()), "nothing was loaded"

    restored = svftune.load_svf(family.build(0), folder / "svf.safetensors")
    resumed, _ = _trainer(family, restored, tmp_path / "resumed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svftune.SVFSaveWarning)
        resumed.train(resume_from_checkpoint=str(folder))
    final, expected = restored.state_dict(), model.state_dict()
    for key, value in expected.items():
        assert (final[key] - value).abs().max() <= ATOL_RESUME, key


def test_the_load_hook_is_registered_once_copied_with_the_model_and_removed_by_merge():
    from svftune._interop import load_merged_weights

    def hooks(model):
        return [h for h in model._load_state_dict_pre_hooks.values() if h.hook is load_merged_weights]

    model = svftune.apply_svf(_gpt2(0), layers=["transformer.h.0"])
    svftune.apply_svf(model, layers=["transformer.h.1"])  # a second call on the same model
    assert len(hooks(model)) == 1
    with torch.no_grad():
        for _, layer in svftune.svf_layers(model):
            layer.S.mul_(1.01)
    state = svftune.merged_state_dict(model)
    copied = svftune.apply_svf(_gpt2(0), exclude=["lm_head"])
    twin = copy.deepcopy(copied)  # the copy's hook reads into the copy
    twin.load_state_dict(state)
    original, loaded = _s_values(copied), _s_values(twin)
    assert all(not torch.equal(original[n], loaded[n]) for n in original)
    plain = svftune.merge_svf(model)
    assert hooks(plain) == [] and plain.load_state_dict(state).missing_keys == []
