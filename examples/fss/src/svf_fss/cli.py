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
    return parser


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
