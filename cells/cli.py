"""What every command-line front shares: help that shows defaults, `--debug`, and the user-error rule.

Each stage describes its subcommands in its own `commands.py` (light imports only, so `--help` is
quick); `smearscope` puts them together, and the module entry points the design card names
(`python batch/run.py`, `python -m export`) build a parser from the same description.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from cells.errors import UserError, first_line

Configure = Callable[[argparse.ArgumentParser], None]
MESSAGE_LIMIT = 2000  # user errors are our own text: cut only what is runaway


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default."""


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")


def add_command(commands: argparse._SubParsersAction, name: str, help: str, configure: Configure) -> argparse.ArgumentParser:
    """A subcommand: its flags from `configure`, which also sets `handler` (args -> exit code)."""
    parser = commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    add_common_flags(parser)
    configure(parser)
    return parser


def add_group(commands: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """A subcommand that only holds subcommands (`smearscope data preview`)."""
    parser = commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def execute(prog: str, args: argparse.Namespace) -> int:
    """Run the parsed command; a UserError is one line on stderr and exit 1, anything else a traceback."""
    try:
        return args.handler(args)
    except UserError as error:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {first_line(error, MESSAGE_LIMIT)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def standalone(prog: str, description: str, configure: Configure, argv: Sequence[str] | None = None) -> int:
    """A module entry point with one subcommand's flags, e.g. `python batch/run.py` for `smearscope run`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_common_flags(parser)
    configure(parser)
    return execute(prog, parser.parse_args(argv))
