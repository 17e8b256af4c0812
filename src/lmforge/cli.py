"""The `lmforge` command line: one table of commands, each a thin function over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# Each command: (help, add_arguments(parser), run(args) -> exit code). Sections below are grouped by library module.
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `run` as the command `name`."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


# --- checkpoints (lmforge.io): info, convert ---------------------------------------------------------------------

# --- generation (lmforge.generation): generate -------------------------------------------------------------------

# --- training (lmforge.training, lmforge.distill): train, finetune, evaluate, distill, plot ------------------------

# --- end of commands ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError, TypeError, KeyError) as err:
        print(f"lmforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
