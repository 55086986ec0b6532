"""``svf-fss train | test | reproduce | show-config | table | make-configs | mini-benchmark | study`` subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import ConfigError, RunConfig, load_config
from .runtime import running

CONFIG_HELP = "a TOML file from examples/fss/configs/ (one per table row); omit for the defaults"
SET_HELP = "override a config key, TOML syntax: --set fold=1 --set lr=0.01 --set 'test_seeds=[510, 365]'"


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set or [])
    for key in ("fold", "shots"):
        value = getattr(args, key, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help=CONFIG_HELP)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    parser.add_argument("--fold", type=int, help="fold 0-3 (same as --set fold=N)")
    parser.add_argument("--shots", type=int, help="K support images (same as --set shots=K)")


def cmd_train(args: argparse.Namespace) -> int:
    """``svf-fss train``: train one run (resuming from its folder), optionally test it, print the summary."""
    from .engine import test, train

    config = _config(args)
    with running(config.device) as process:
        summary = train(config, process)
        if args.test:
            summary["test"] = test(config, process)
    if process.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_train_base(args: argparse.Namespace) -> int:
    """``svf-fss train-base``: BAM stage 1, the PSPNet base learner of one fold."""
    from .engine import train_base_learner

    config = _config(args)
    with running(config.device) as process:
        train_base_learner(config, process)
    return 0


class RunNotTrained(ConfigError):
    """``svf-fss test`` on a config whose run folder holds no checkpoint (the CLI prints it without a traceback)."""


def cmd_test(args: argparse.Namespace) -> int:
    """``svf-fss test``: evaluate a trained run's best or last checkpoint on every test seed."""
    from .engine import BEST_FILE, STATE_FILE, test

    config = _config(args)
    which = args.checkpoint or config.test_checkpoint
    checkpoint = config.output_dir() / (BEST_FILE if which == "best" else STATE_FILE)
    if not checkpoint.is_file():
        raise RunNotTrained(
            f"no {which} checkpoint at {checkpoint}: train this run first (svf-fss train with the same config and "
            "--set/--fold/--shots), or point --set output=... at the run folder"
        )
    with running(config.device) as process:
        record = test(config, process, which=args.checkpoint)
    if process.is_main:
        print(json.dumps(record, indent=2))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """One table row: train and test every fold, then print the row."""
    from .engine import iterate_folds, test, train
    from .table import collect_runs, markdown_table

    config = _config(args)
    folds = [int(f) for f in args.folds.split(",")]
    with running(config.device) as process:
        for fold_config in iterate_folds(config, folds):
            train(fold_config, process)
            for which in ("best", "last"):
                test(fold_config, process, which=which)
    if process.is_main:
        root = Path(config.output.split("{")[0] or ".")
        for which in ("best", "last"):
            print(markdown_table(collect_runs(root, which), which))
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    """``svf-fss table``: collect finished runs into the paper's table layout (Markdown)."""
    from .table import collect_runs, markdown_table

    text = markdown_table(collect_runs(args.runs, args.checkpoint), args.checkpoint)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    """``svf-fss show-config``: every config key with its resolved value (defaults < file < --set), as TOML."""
    from .configs import toml_value

    config = _config(args)
    for key, value in config.to_dict().items():
        print(f"{key} = {toml_value(value)}" if value is not None else f"# {key} = (none)")
    print(f"# run folder: {config.output_dir()}")
    return 0


def cmd_make_configs(args: argparse.Namespace) -> int:
    """``svf-fss make-configs``: write the per-row config files."""
    from .configs import write_configs

    paths = write_configs(Path(args.out))
    print(f"wrote {len(paths)} config files under {args.out}")
    return 0


def cmd_mini_benchmark(args: argparse.Namespace) -> int:
    """``svf-fss mini-benchmark``: the offline CPU comparison of frozen, SVF and full fine-tuning."""
    from .mini_benchmark import run_mini_benchmark

    run_mini_benchmark(Path(args.out), data_root=args.data, strategies=args.strategies.split(","), quick=args.quick)
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers such as 0,1,2,3, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(";" if ":" in text else ",") if t.strip()]


def cmd_study(args: argparse.Namespace) -> int:
    """``svf-fss study``: every fold x seed x strategy on the mini data, resumable, with confidence intervals."""
    from .study import StudyPlan, run_study

    options = {}
    if args.quick:  # CI: 2 folds x 1 seed x 2 strategies x a few iterations, probe on SVF only
        options = {"folds": [0, 1], "seeds": [321], "strategies": ["frozen", "svf"], "long_strategies": ["svf"]}
    for key in ("folds", "seeds", "long_seeds"):
        if getattr(args, key) is not None:
            options[key] = _ints(getattr(args, key))
    for key in ("strategies", "long_strategies"):
        if getattr(args, key) is not None:
            options[key] = _names(getattr(args, key))
    if args.long_factor is not None:
        options["long_factor"] = args.long_factor
    plan = StudyPlan(quick=args.quick, **options)
    run_study(Path(args.out), plan, data_root=args.data, threads=args.threads, keep_checkpoints=args.keep_checkpoints)
    print(f"report: {Path(args.out) / 'results.md'} (records: {Path(args.out) / 'records.jsonl'})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the training subcommands to the ``svf-fss`` parser."""
    p = sub.add_parser(
        "train",
        help="train one run (resumes from its folder's last checkpoint)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.description = "Train one run of a config (one table row) for one fold and K, resuming from its run folder."
    p.epilog = (
        "outputs:\n"
        "  the run folder is the config key 'output', relative to the current directory; default\n"
        "    runs/{dataset}/{backbone}/{method}-{strategy}/{shots}shot/fold{fold}\n"
        "  it gets config.json, provenance.json, last.pt, best.pt, last.svf.safetensors, evals.csv,\n"
        "  evals.jsonl, tensorboard/, train_summary.json, and test_best.json with --test.\n"
        "config keys:\n"
        "  svf-fss show-config [CONFIG] [--set KEY=VALUE ...]   every key with its resolved value\n"
        "  (what each key means: examples/fss/README.md, 'Training, testing and the tables')"
    )
    _add_common(p)
    p.add_argument("--test", action="store_true", help="also test the best checkpoint when training ends")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-base", help="BAM stage 1: train the PSPNet base learner of one fold")
    _add_common(p)
    p.set_defaults(func=cmd_train_base)

    p = sub.add_parser("test", help="test a trained run on the test episodes (every test seed)")
    _add_common(p)
    p.add_argument("--checkpoint", choices=("best", "last"), help="which checkpoint (default: config's)")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("reproduce", help="one table row: train + test each fold, print the row")
    _add_common(p)
    p.add_argument("--folds", default="0,1,2,3", help="comma-separated folds (default 0,1,2,3)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("show-config", help="print every config key with its value (defaults, file, --set)")
    _add_common(p)
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("table", help="collect finished runs into the paper's table layout (Markdown)")
    p.add_argument("runs", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="whose test results (default best)")
    p.add_argument("--out", help="also write the Markdown here")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("make-configs", help="(re)generate the per-row config files")
    p.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parents[3] / "configs"),
        help="output folder (default: examples/fss/configs of this checkout)",
    )
    p.set_defaults(func=cmd_make_configs)

    p = sub.add_parser("mini-benchmark", help="offline CPU benchmark: frozen vs SVF vs full fine-tuning")
    p.add_argument("--out", default="runs/mini-benchmark", help="output folder (runs, results, plot)")
    p.add_argument("--data", default=None, help="mini dataset folder (generated there if missing)")
    p.add_argument("--strategies", default="frozen,svf,full", help="comma-separated (default frozen,svf,full)")
    p.add_argument("--quick", action="store_true", help="a few iterations only (smoke test)")
    p.set_defaults(func=cmd_mini_benchmark)

    p = sub.add_parser(
        "study", help="frozen vs SVF vs full fine-tuning vs LoRA over folds x seeds, with confidence intervals"
    )
    p.description = (
        "Run the mini benchmark's settings for every fold x seed x strategy, then a longer schedule for some "
        "strategies (overfitting probe). Each finished run is appended to OUT/records.jsonl; run the same command "
        "again to resume. OUT/results.md, results.png, summary.json and records.csv are rewritten after every run."
    )
    p.add_argument("--out", default="runs/study", help="study folder: records, report, runs (default runs/study)")
    p.add_argument("--data", default=None, help="mini dataset folder (generated under OUT/data if missing)")
    p.add_argument("--folds", default=None, help="comma-separated folds (default 0,1,2,3)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default 321,322,323)")
    p.add_argument(
        "--strategies",
        default=None,
        help="comma-separated strategies (default frozen,svf,full,lora; ';' if any has ':')",
    )
    p.add_argument(
        "--long-factor", type=int, default=None, help="probe schedule = this x the epochs (default 3; 1: off)"
    )
    p.add_argument("--long-strategies", default=None, help="strategies of the longer-schedule probe (default svf,full)")
    p.add_argument("--long-seeds", default=None, help="seeds of the probe (default 321)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when other jobs share the cores)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's last.pt / best.pt")
    p.add_argument("--quick", action="store_true", help="CI smoke test: 2 folds x 1 seed x frozen,svf x 3 iterations")
    p.set_defaults(func=cmd_study)


__all__ = ["ConfigError", "register"]
