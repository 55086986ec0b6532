"""Training engine: configs, schedules, smoke runs of every method on the mini data, resume, table, torchrun."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from svf_fss.train import ConfigError, load_config, lr_factor
from svf_fss.train.commands import register  # noqa: F401  (the CLI registers these)
from svf_fss.train.configs import write_configs
from svf_fss.train.engine import test as run_test
from svf_fss.train.engine import train as run_train
from svf_fss.train.runtime import Process
from svf_fss.train.table import PAPER, collect_runs, markdown_table

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny(mini_root: Path, out: Path, **values) -> dict:
    settings = {
        "dataset": "mini",
        "data_root": str(mini_root),
        "backbone": "mobilenet_v2",
        "method": "baseline",
        "strategy": "svf",
        "crop": 65,
        "test_size": 65,
        "batch_size": 2,
        "max_iterations": 2,
        "epochs": 1,
        "val_episodes": 4,
        "test_episodes": 4,
        "workers": 0,
        "device": "cpu",
        "progress": False,
        "tensorboard": False,
        "output": str(out),
    }
    settings.update(values)
    return settings


# ------------------------------------------------------------------------------------------- configs
def test_committed_configs_are_what_the_generator_writes(tmp_path):
    written = write_configs(tmp_path)
    assert len(written) == 48
    for path in written:
        committed = CONFIGS / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `svf-fss make-configs`"


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.rglob("*.toml") if p.parent.name != "base"))
def test_every_row_config_loads(path):
    config = load_config(path, ["fold=2", "shots=5"])
    assert config.fold == 2 and config.shots == 5
    assert config.method in ("baseline", "pfenet", "bam")
    if path.stem == "bam-base":
        assert config.schedule == "poly" and config.scale == [0.5, 2.0] and config.crop == 417
    elif path.stem.endswith("-release"):  # the SVF release's own settings
        assert config.kshot == "sum" and config.dilation == "torchvision"
        assert config.schedule == ("constant" if config.strategy == "svf" else "poly")
    elif config.strategy == "svf" and path.parent.name != "ablations":
        assert config.schedule == "cosine" and config.lr == 0.015
    if not path.stem.endswith("-release"):
        assert config.kshot == "mean"
    if config.strategy == "frozen":
        assert config.schedule == "poly"


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.rglob("*.toml") if p.parent.name != "base"))
def test_every_row_config_states_the_dilation_of_the_code_behind_its_row(path):
    """The SVF release's baseline and PFENet use the torchvision-style ResNet, its BAM (and BAM's and PFENet's own
    code, which the frozen PFENet/BAM rows follow) the PSPNet patch; the key is in the file, not left to defaults."""
    text = path.read_text()
    assert text.count("\ndilation = ") == 1, f"{path} does not state its dilation style"
    config = load_config(path)
    svf_release_model = config.method == "baseline" or (config.method == "pfenet" and config.strategy != "frozen")
    assert config.dilation == ("torchvision" if svf_release_model else "pspnet")


def test_run_model_has_the_config_s_dilation_and_kshot():
    from svf_fss.train.engine import build_run_model

    config = load_config(None, ["strategy=frozen", "shots=5", "dilation=torchvision", "kshot=sum"])
    model = build_run_model(config)
    assert model.backbone.dilation == "torchvision" and model.kshot == "sum"


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key.*learning_rate"):
        load_config(None, ["learning_rate=0.1"])
    with pytest.raises(ConfigError, match="lr must be a number"):
        load_config(None, ["lr=fast"])
    with pytest.raises(ConfigError, match="fold must be 0, 1, 2 or 3"):
        load_config(None, ["fold=4"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_config(None, ["fold"])
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    loop = tmp_path / "loop.toml"
    loop.write_text('base = "loop.toml"\n')
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(loop)


def test_overrides_use_toml_values():
    config = load_config(None, ["lr=1", "test_seeds=[510, 365]", "amp=bf16", "grad_clip=none", "trick=false"])
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.test_seeds == [510, 365] and config.amp == "bf16" and config.grad_clip is None
    assert config.trick is False


def test_lr_schedules():
    assert lr_factor("cosine", 0, 100) == 1.0
    assert math.isclose(lr_factor("cosine", 50, 100), 0.5)
    assert lr_factor("cosine", 100, 100) == 0.0
    assert math.isclose(lr_factor("poly", 50, 100, 0.9), 0.5**0.9)
    assert lr_factor("constant", 99, 100) == 1.0
    values = [lr_factor("cosine", i, 40) for i in range(41)]
    assert all(a >= b for a, b in itertools.pairwise(values)), "decays every iteration"


# ------------------------------------------------------------------------------------------- smoke runs
@pytest.mark.parametrize("method", ["baseline", "pfenet", "bam"])
def test_smoke_train_and_test_every_method(mini_root, tmp_path, method):
    config = load_config(None, tiny(mini_root, tmp_path / method, method=method))
    summary = run_train(config, Process())
    assert summary["iterations"] == 2
    out = tmp_path / method
    for name in ("config.json", "provenance.json", "last.pt", "last.svf.safetensors", "evals.csv", "best.pt"):
        assert (out / name).exists(), name
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["torch"] == torch.__version__ and provenance["seed"] == config.seed
    state = torch.load(out / "last.pt", weights_only=False)
    assert not any(k.startswith("backbone.") and not k.endswith(".S") for k in state["trainable"]), (
        "the frozen backbone is never stored"
    )
    record = run_test(config, Process(), which="last")
    assert 0.0 <= record["miou"] <= 1.0 and 0.0 <= record["fb_iou"] <= 1.0
    assert json.loads((out / "test_last.json").read_text())["episodes"] == 4


def test_test_rebuilds_the_trained_backbone(mini_root, tmp_path, monkeypatch):
    """A backbone without pretrained weights is random: test() must rebuild the one that was trained."""
    from svf_fss.train import engine

    import svftune

    config = load_config(None, tiny(mini_root, tmp_path / "run", max_iterations=1))
    assert config.backbone_weights is None
    run_train(config, Process())
    built = []
    build = engine.build_run_model
    monkeypatch.setattr(engine, "build_run_model", lambda c: built.append(build(c)) or built[-1])
    torch.manual_seed(12345)  # whatever the global generator holds
    run_test(config, Process(), which="last")
    # load_svf checks every adapted layer's base-weight fingerprint and raises on a different backbone
    svftune.load_svf(built[0], tmp_path / "run" / "last.svf.safetensors")


def test_bam_stage1_base_learner_then_stage2(mini_root, tmp_path):
    from svf_fss.train.engine import train_base_learner

    values = tiny(mini_root, tmp_path / "base", method="bam", scale=[0.5, 2.0], lr=0.0025, schedule="poly")
    path = train_base_learner(load_config(None, values), Process())
    assert path.exists() and path.name == "pspnet.pth"
    stage2 = tiny(mini_root, tmp_path / "bam", method="bam", base_learner=str(path), max_iterations=1)
    assert run_train(load_config(None, stage2), Process())["iterations"] == 1


def test_resume_continues_from_the_last_checkpoint(mini_root, tmp_path):
    values = tiny(mini_root, tmp_path / "run", max_iterations=1)
    first = run_train(load_config(None, values), Process())
    assert first["iterations"] == 1
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    values.update(max_iterations=None, epochs=2)  # one more epoch: starts at epoch 2 from the saved state
    config = load_config(None, values)
    from svf_fss.train.engine import build_datasets

    per_epoch = len(build_datasets(config)[0]) // config.batch_size
    second = run_train(config, Process())
    assert second["iterations"] == 1 + per_epoch
    assert saved["epoch"] == 0 and saved["iteration"] == 1


def test_table_layout(tmp_path):
    for fold, miou in enumerate([0.6, 0.62, 0.64, 0.66]):
        for strategy, bonus in (("frozen", 0.0), ("svf", 0.02)):
            run = tmp_path / strategy / f"fold{fold}"
            run.mkdir(parents=True)
            config = {"dataset": "pascal", "backbone": "resnet50_v2", "shots": 1, "fold": fold}
            config.update(method="baseline", strategy=strategy, trick=True)
            (run / "config.json").write_text(json.dumps(config))
            (run / "test_best.json").write_text(json.dumps({"miou": miou + bonus}))
    text = markdown_table(collect_runs(tmp_path))
    assert "| baseline†+SVF | 62.00 | 64.00 | 66.00 | 68.00 | 65.00 | +2.00 | 67.14 |" in text
    assert "| baseline† | 60.00 | 62.00 | 64.00 | 66.00 | 63.00 |  | 65.07 |" in text
    assert PAPER[("coco", "bam", True, "resnet50_v2", 5)] == 53.87


def test_table_keeps_release_kshot_runs_apart(tmp_path):
    for kshot, bonus in (("mean", 0.0), ("sum", 0.05)):
        for strategy in ("frozen", "svf"):
            run = tmp_path / kshot / strategy
            run.mkdir(parents=True)
            config = {"dataset": "pascal", "backbone": "resnet50_v2", "shots": 5, "fold": 0, "kshot": kshot}
            config.update(method="baseline", strategy=strategy, trick=True)
            (run / "config.json").write_text(json.dumps(config))
            (run / "test_best.json").write_text(json.dumps({"miou": 0.5 + bonus + (0.01 if strategy == "svf" else 0)}))
    text = markdown_table(collect_runs(tmp_path))
    assert "| baseline†+SVF | 51.00 |" in text and "| baseline†+SVF (K-shot sum) | 56.00 |" in text
    assert "| baseline† (K-shot sum) | 55.00 |" in text and "| baseline† | 50.00 |" in text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
def test_torchrun_two_processes(mini_root, tmp_path):
    settings = tiny(mini_root, tmp_path / "ddp", max_iterations=2, batch_size=4)
    args = [f"--set={k}={json.dumps(v)}" for k, v in settings.items()]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "svf_fss.cli",
        "train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["iterations"] == 2
    assert json.loads((tmp_path / "ddp" / "provenance.json").read_text())["world_size"] == 2


def test_mini_benchmark_quick(mini_root, tmp_path):
    from svf_fss.train.mini_benchmark import run_mini_benchmark

    records = run_mini_benchmark(tmp_path, data_root=str(mini_root), strategies=["frozen", "svf"], quick=True)
    assert [r["strategy"] for r in records] == ["frozen", "svf"]
    assert records[1]["trainable"] > records[0]["trainable"], "SVF trains the head plus singular values"
    assert all(r["iterations"] == 3 and 0 <= r["miou"] <= 1 for r in records)
    assert json.loads((tmp_path / "results.json").read_text()) == records
    assert "| svf |" in (tmp_path / "results.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "results.png").stat().st_size > 1000
    for name in ("qualitative.png", "sv_changes.png", "activations.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000, name
