"""The `smearscope` command: one subcommand per stage, each stage describing its own (`<stage>/commands.py`)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import batch.commands
import bench.commands
import deploy.commands
import export.commands
import train.commands
import web.commands
from cells.cli import HelpFormatter, execute

STAGES = (train.commands, export.commands, deploy.commands, batch.commands, bench.commands, web.commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smearscope", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGES:
        stage.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(f"smearscope {args.command}", args)
