"""svf-fss figures: qualitative results and SVF Figures 4-6 from tiny trained runs on the mini data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from svf_fss.cli import main
from svf_fss.data import FSSMeter
from svf_fss.train import load_config
from svf_fss.train.engine import train as run_train
from svf_fss.train.runtime import Process

from svftune import plots

pytestmark = [pytest.mark.usefixtures("one_thread")]
pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def tiny(mini_root, out, strategy):
    return {
        "dataset": "mini",
        "data_root": str(mini_root),
        "backbone": "mobilenet_v2",
        "method": "baseline",
        "strategy": strategy,
        "crop": 65,
        "test_size": 65,
        "batch_size": 2,
        "max_iterations": 2,
        "epochs": 1,
        "lr": 0.5,  # large enough for visible singular-value changes after 2 steps
        "val_episodes": 4,
        "test_episodes": 12,
        "workers": 0,
        "device": "cpu",
        "progress": False,
        "tensorboard": False,
        "output": str(out),
    }


@pytest.fixture(scope="module")
def bench(mini_root, tmp_path_factory):
    """A mini-benchmark-shaped folder: runs/frozen and runs/svf, two training steps each."""
    root = tmp_path_factory.mktemp("bench")
    for strategy in ("svf", "frozen"):
        run_train(load_config(None, tiny(mini_root, root / "runs" / strategy, strategy)), Process())
    return root


def test_figures_command_writes_the_three_pictures(bench, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["figures", str(bench), "--out", str(out), "--count", "2", "--top", "2", "--dpi", "40"]) == 0
    printed = capsys.readouterr().out
    for name in ("qualitative.png", "sv_changes.png", "activations.png"):
        assert (out / name).read_bytes()[:8] == PNG
        assert f"wrote {out / name}" in printed


def test_episodes_predictions_and_ious_match_the_evaluation_metric(bench):
    from svf_fss.figures import (
        default_episodes,
        expand_runs,
        load_run,
        plot_qualitative,
        predict_episodes,
        test_dataset,
    )

    folders = expand_runs([bench])
    assert [f.name for f in folders] == ["frozen", "svf"]  # the benchmark's order, not the alphabet's
    runs = [load_run(f) for f in folders]
    dataset = test_dataset(runs[0].config)
    indices = default_episodes(dataset, 3)
    classes = [dataset.table[i].cls for i in indices]
    assert classes == sorted(set(classes)) and len(classes) == 3  # one episode per class, in class order
    for index, cls in zip(indices, classes, strict=True):  # ... the first of its class
        assert all(dataset.table[i].cls != cls for i in range(index))
    records = predict_episodes(runs, dataset, indices)
    for record in records:
        assert record["query"].shape[:2] == record["truth"].shape == record["predictions"]["svf"].shape
        for run in runs:
            meter = FSSMeter(dataset.novel)
            prediction = torch.from_numpy(record["predictions"][run.name]).long()
            meter.update(prediction, torch.from_numpy(record["truth"]).long(), record["class"])
            c = record["class"]
            expected = meter.inter[c] / meter.union[c] if meter.union[c] else 1.0
            assert record["iou"][run.name] == pytest.approx(expected, abs=1e-12)
        # the prediction is the one the evaluation computes for this episode
        item = dataset[record["index"]]
        from svf_fss.data import to_original_size

        with torch.no_grad():
            logits = runs[1].model(item["query"][None], item["support"][None], item["support_mask"][None])
        expected = to_original_size(logits, record["truth"].shape).argmax(1)[0].numpy()
        assert np.array_equal(record["predictions"]["svf"], expected)
    fig = plot_qualitative(records, ["frozen", "svf"])
    assert len(fig.axes) == 3 * (3 + 2)
    assert fig.axes[0].get_title().startswith("support: ") and fig.axes[-1].get_title() == "ground truth"


def test_svf_figures_use_the_run_model(bench):
    from svf_fss.figures import default_layer, load_run

    run = load_run(bench / "runs" / "svf")
    layer = default_layer(run.model)
    changes = plots.singular_value_changes(run.model)
    largest = max((c for c in changes.values() if c.rank > 1), key=lambda c: float(c.delta.abs().max()))
    assert layer == largest.name and float(largest.delta.abs().max()) > 0
    # the saved singular-value file holds the same changes as the rebuilt model
    saved = plots.singular_value_changes(bench / "runs" / "svf" / "best.svf.safetensors", layer)[layer]
    order = {(int(g), int(r)): float(d) for g, r, d in zip(saved.group, saved.index, saved.delta, strict=True)}
    for g, r, d in zip(changes[layer].group, changes[layer].index, changes[layer].delta, strict=True):
        assert order[(int(g), int(r))] == pytest.approx(float(d), abs=1e-7)


def test_figures_errors_are_one_line(bench, tmp_path, capsys):
    out = str(tmp_path / "e")
    assert main(["figures", str(bench), "--out", out, "--layer", "backbone.nope"]) == 2
    err = capsys.readouterr().err
    assert "no SVF layer 'backbone.nope'" in err and "backbone.layer2.0.conv.0.0" in err and "Traceback" not in err
    assert main(["figures", str(bench / "runs" / "frozen"), "--out", out, "--layer", "x"]) == 2
    assert "none of the runs uses SVF" in capsys.readouterr().err
    assert main(["figures", str(tmp_path), "--out", out]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert main(["figures", str(bench), "--out", out, "--episodes", "0,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["figures", str(bench / "runs" / "svf"), "--out", out, "--episodes", "99"]) == 2
    assert "episode 99 is out of range" in capsys.readouterr().err


def test_a_moved_run_finds_its_data_or_says_to_give_it(bench, mini_root, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(bench / "runs" / "svf", moved)
    config = json.loads((moved / "config.json").read_text())
    config["data_root"] = "nowhere/data"
    (moved / "config.json").write_text(json.dumps(config))
    out = str(tmp_path / "f")
    assert main(["figures", str(moved), "--out", out, "--count", "1", "--dpi", "30"]) == 2
    assert "give its folder with --data" in capsys.readouterr().err
    args = ["figures", str(moved), "--out", out, "--count", "1", "--dpi", "30", "--data", str(mini_root)]
    assert main(args) == 0


def test_a_rebuilt_model_with_other_base_weights_is_refused(bench, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(bench / "runs" / "svf", other)
    config = json.loads((other / "config.json").read_text())
    config["seed"] += 1  # random-init backbone: another seed builds other base weights
    (other / "config.json").write_text(json.dumps(config))
    assert main(["figures", str(other), "--out", str(tmp_path / "g")]) == 2
    assert "does not have the base weights this run was trained on" in capsys.readouterr().err
