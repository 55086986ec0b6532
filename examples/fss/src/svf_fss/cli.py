"""``svf-fss`` command line: a thin dispatcher; each area registers its own subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .data.errors import DataError
from .train.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from .data import commands as data_commands
    from .train import commands as train_commands

    parser = argparse.ArgumentParser(prog="svf-fss", description="Few-shot segmentation with SVF (svftune).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_commands.register(sub)
    train_commands.register(sub)
    _register_figures(sub)
    return parser


def _register_figures(sub: argparse._SubParsersAction) -> None:
    """``svf-fss figures`` (its module, with torch and matplotlib, is imported only when it runs)."""
    p = sub.add_parser("figures", help="pictures of trained runs: qualitative results, SVF paper Figures 4-6")
    p.description = (
        "Write qualitative.png (rows of support + mask, query, each run's prediction, ground truth) and, for the "
        "first run that uses SVF, sv_changes.png (largest singular-value changes of one layer, Figure 6 of the "
        "paper) and activations.png (activation maps of the directions whose singular values grew and shrank "
        "most, Figures 4-5). Needs matplotlib (pip install 'svftune[plots]')."
    )
    p.add_argument("runs", nargs="+", help="run folders, or a mini-benchmark folder (its runs/frozen, svf, full)")
    p.add_argument("--out", required=True, help="output folder for the PNG files")
    p.add_argument("--episodes", help="comma-separated test episode indices (default: one per novel class)")
    p.add_argument("--count", type=int, default=5, help="episodes drawn by default (default 5)")
    p.add_argument("--layer", help="SVF layer for sv_changes.png / activations.png (default: largest change)")
    p.add_argument("--top", type=int, default=3, help="directions per side in activations.png (default 3)")
    p.add_argument(
        "--by", choices=("absolute", "relative"), default="absolute", help="rank changes by S - S0 or (S - S0) / S0"
    )
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default best)")
    p.add_argument("--data", help="dataset folder, if the runs' config data_root does not lead to it")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG files (default 100)")
    p.set_defaults(func=_figures)


def _figures(args: argparse.Namespace) -> int:
    from .figures import cmd_figures

    return cmd_figures(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; data problems print their message (no traceback) and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError) as e:
        print(f"svf-fss {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
