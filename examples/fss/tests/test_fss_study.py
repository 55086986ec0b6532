"""``svf-fss study``: the plan (order, pairing, schedules), the statistics (t intervals, paired differences against
independent computations), the report files, and resuming after an interruption."""

from __future__ import annotations

import json
import math
import random

import pytest
from svf_fss.cli import main
from svf_fss.train.config import ConfigError
from svf_fss.train.study import RECORDS, StudyPlan, claim, read_records, run_study
from svf_fss.train.study_report import interval, markdown, paired, records_csv, summarize, t_critical


def _record(schedule, fold, seed, strategy, miou, fb_iou=0.5):
    return {
        "schedule": schedule, "fold": fold, "seed": seed, "strategy": strategy, "miou": miou, "fb_iou": fb_iou,
        "train_seconds": 10.0, "iterations": 5, "epochs": 10 * schedule, "trainable": 100, "trainable_backbone": 7,
        "test_episodes": 8, "threads": 1, "load_start": 1.0, "load_end": 2.0, "resumed": False, "finished": "now",
    }  # fmt: skip


def test_t_critical_values_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t_critical(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4), df
    for df in (31, 40, 60, 120, 1000):
        assert t_critical(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
    with pytest.raises(ValueError):
        t_critical(0)


def test_interval_is_the_student_t_interval():
    values = [0.51, 0.55, 0.49, 0.60, 0.58]
    mean = sum(values) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    got = interval(values)
    assert got["mean"] == pytest.approx(mean) and got["sd"] == pytest.approx(sd)
    assert got["hi"] - got["mean"] == pytest.approx(2.776 * sd / math.sqrt(5))
    assert got["lo"] < mean < got["hi"]
    single = interval([0.4])
    assert single["mean"] == 0.4 and single["lo"] is None and single["hi"] is None


def test_paired_differences_pair_by_fold_and_seed():
    rng = random.Random(0)
    records = []
    for fold in range(4):
        for seed in (1, 2, 3):
            base = 0.3 + 0.1 * fold  # folds differ a lot; the paired difference removes that
            records.append(_record(1, fold, seed, "svf", base + 0.02 + rng.uniform(-0.003, 0.003)))
            if (fold, seed) != (3, 3):  # one run missing: it cannot pair up
                records.append(_record(1, fold, seed, "full", base + rng.uniform(-0.003, 0.003)))
    rng.shuffle(records)
    svf = {(r["fold"], r["seed"]): r["miou"] for r in records if r["strategy"] == "svf"}
    full = {(r["fold"], r["seed"]): r["miou"] for r in records if r["strategy"] == "full"}
    diffs = [svf[k] - full[k] for k in sorted(full)]
    got = paired(records, "svf", "full")
    assert got["n"] == 11 and got["wins"] == 11 and got["losses"] == 0
    assert got["mean"] == pytest.approx(sum(diffs) / 11)
    assert got["lo"] > 0.01, "paired: the fold spread (0.1 per fold) must not widen the interval"
    unpaired = interval(list(svf.values()))
    assert unpaired["hi"] - unpaired["lo"] > 10 * (got["hi"] - got["lo"])
    assert paired(records, "svf", "lora") is None


def test_summary_markdown_and_csv():
    records = [_record(1, f, s, name, 0.4 + 0.01 * f + (0.02 if name == "svf" else 0)) for f in (0, 1) for s in (1, 2)
               for name in ("frozen", "svf", "full")]  # fmt: skip
    records += [_record(3, f, 1, name, 0.41 + 0.01 * f) for f in (0, 1) for name in ("svf", "full")]
    summary = summarize(records)
    assert set(summary["strategies"]) == {"x1/frozen", "x1/svf", "x1/full", "x3/svf", "x3/full"}
    assert summary["strategies"]["x1/svf"]["miou"]["n"] == 4
    assert set(summary["paired"]) == {"x1/svf-frozen", "x1/svf-full", "x3/svf-full"}
    assert summary["paired"]["x1/svf-frozen"]["miou"]["mean"] == pytest.approx(0.02)
    effect = summary["schedule_effect"]["x3-x1/full"]  # x3 seed 1 minus x1 seed 1, folds 0 and 1
    assert effect["n"] == 2 and effect["mean"] == pytest.approx(0.01)
    text = markdown(summary, len(records), 20)
    assert (
        "Runs finished: 16 of 20" in text and "| x1 | svf | 4 | 42.50 [" in text and "| x1 | svf - full | 4 |" in text
    )
    rows = records_csv(records).splitlines()
    assert len(rows) == 17 and rows[0].startswith("schedule,fold,seed,strategy,miou,fb_iou,train_seconds")


def test_svf_is_also_compared_with_ablation_strategies_the_records_hold():
    records = [_record(1, f, 1, name, 0.4 + 0.01 * f + (0.03 if name == "svf" else 0.0))
               for f in (0, 1, 2) for name in ("frozen", "svf", "bn", "lora")]  # fmt: skip
    summary = summarize(records)
    assert list(summary["paired"]) == ["x1/svf-frozen", "x1/svf-lora", "x1/svf-bn"]  # the fixed ones first
    assert summary["paired"]["x1/svf-bn"]["miou"]["mean"] == pytest.approx(0.03)
    assert "| x1 | svf - bn | 3 |" in markdown(summary, len(records), len(records))


def test_plan_order_schedules_and_fixed_test_episodes(tmp_path):
    plan = StudyPlan(strategies=["frozen", "svf", "full", "lora"], long_factor=3)
    runs = plan.runs()
    assert len(runs) == 4 * 3 * 4 + 4 * 2
    assert {r["seed"] for r in runs[:16]} == {321} and {r["fold"] for r in runs[:16]} == {0, 1, 2, 3}
    assert {r["schedule"] for r in runs[-8:]} == {3}
    values = [plan.run_values(r, tmp_path, tmp_path / "data") for r in runs]
    assert {json.dumps(v["test_seeds"]) for v in values} == {"[321]"}, "seeds must not change the test episodes"
    assert {v["epochs"] for v in values} == {plan.settings["epochs"], 3 * plan.settings["epochs"]}
    assert len({v["output"] for v in values}) == len(runs)
    with pytest.raises(ConfigError, match="unknown strategy"):
        StudyPlan(strategies=["svf", "nope"])
    with pytest.raises(ConfigError, match="folds must be among"):
        StudyPlan(folds=[4])


def test_read_records_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / RECORDS
    path.write_text(json.dumps(_record(1, 0, 1, "svf", 0.5)) + "\n" + '{"schedule": 1, "fo')
    assert len(read_records(path)) == 1
    path.write_text('{"broken\n' + json.dumps(_record(1, 0, 1, "svf", 0.5)) + "\n")
    with pytest.raises(ConfigError, match=":1 is not a JSON record"):
        read_records(path)


@pytest.mark.slow
def test_quick_study_writes_the_report_and_resumes(mini_root, tmp_path, monkeypatch):
    out = tmp_path / "study"
    args = ["study", "--quick", "--out", str(out), "--data", str(mini_root), "--threads", "1"]
    args += ["--strategies", "frozen,lora", "--long-factor", "2", "--long-strategies", "frozen"]
    assert main(args) == 0
    records = read_records(out / RECORDS)
    assert [(r["schedule"], r["fold"], r["strategy"]) for r in records] == [
        (1, 0, "frozen"), (1, 0, "lora"), (1, 1, "frozen"), (1, 1, "lora"), (2, 0, "frozen"), (2, 1, "frozen"),
    ]  # fmt: skip
    assert all(0 <= r["miou"] <= 1 and 0 <= r["fb_iou"] <= 1 for r in records)
    assert [r["iterations"] for r in records] == [3, 3, 3, 3, 6, 6]
    lora = [r for r in records if r["strategy"] == "lora"]
    assert all(r["trainable_backbone"] > 0 for r in lora)
    assert all(r["trainable_backbone"] == 0 for r in records if r["strategy"] == "frozen")
    assert "| x1 | frozen - " not in (out / "results.md").read_text()
    assert len((out / "records.csv").read_text().splitlines()) == 7
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategies"]["x1/lora"]["miou"]["n"] == 2
    if pytest.importorskip("matplotlib"):
        assert (out / "results.png").stat().st_size > 1000
    assert not (out / "runs" / "x1" / "fold0" / "seed321" / "lora" / "last.pt").exists()

    # resume: nothing left to train; then a lost last record (killed before it was written) trains that run only
    import svf_fss.train.engine as engine

    calls = []
    real_train = engine.train

    def counting_train(config, process):
        calls.append(config.output)
        return real_train(config, process)

    monkeypatch.setattr(engine, "train", counting_train)
    assert main(args) == 0 and calls == []
    lines = (out / RECORDS).read_text().splitlines()
    (out / RECORDS).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # torn last line
    assert main(args) == 0
    assert len(calls) == 1 and calls[0].endswith("x2/fold1/seed321/frozen")
    assert [r["strategy"] for r in read_records(out / RECORDS)] == [r["strategy"] for r in records]

    # other run settings in the same folder: refused (runs would not be comparable)
    with pytest.raises(ConfigError, match="other run settings"):
        run_study(out, StudyPlan(quick=False, folds=[0, 1], seeds=[321]), data_root=mini_root)


def test_claim_is_exclusive_and_released(tmp_path):
    lock = tmp_path / "runs" / "x1" / "run.lock"
    with claim(lock) as first:
        assert first
        with claim(lock) as second:  # another open file description: what a second process would get
            assert not second
    with claim(lock) as again:
        assert again


@pytest.mark.slow
def test_two_processes_share_one_study(mini_root, tmp_path):
    """Two study processes on one folder train every run once between them and leave one complete record each."""
    import subprocess
    import sys

    out = tmp_path / "shared"
    command = [sys.executable, "-m", "svf_fss.cli", "study", "--quick", "--out", str(out), "--data", str(mini_root)]
    command += ["--strategies", "frozen", "--folds", "0,1", "--seeds", "321,322", "--long-factor", "1"]
    command += ["--threads", "1"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    records = read_records(out / RECORDS)
    keys = sorted((r["fold"], r["seed"]) for r in records)
    assert keys == [(0, 321), (0, 322), (1, 321), (1, 322)], logs
    assert "Runs finished: 4 of 4" in (out / "results.md").read_text()
