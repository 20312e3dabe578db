"""One shape for every command: help on each flag with its default, one-line user errors, --debug."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cells.cli import execute
from cells.errors import MissingInput, first_line
from smearscope.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "smearscope"):
    """Every runnable subcommand's parser, by its full name."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield prefix, parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from leaf_parsers(sub, f"{prefix} {name}")


COMMANDS = dict(leaf_parsers(build_parser()))


def test_every_stage_has_its_subcommands():
    expected = {"train", "evaluate", "soup", "remote pack", "remote fit", "remote import", "data preview",
                "data stats", "data stain-reference", "export", "quantize", "build-engine", "serve", "run", "evaluate-slides",
                "evaluate-detection", "bench serve", "bench batch", "bench feed", "bench shutdown", "bench runtimes", "bench storage",
                "bench field-model", "bench field-data", "bench compare-runs", "bench operating-point", "web", "train-detector", "export-detector", "adapt"}
    assert {name.removeprefix("smearscope ") for name in COMMANDS} == expected


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_has_help_and_shows_its_default(name):
    parser = COMMANDS[name]
    assert parser.get_default("handler") is not None, f"{name} sets no handler"
    flags = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert any(a.dest == "debug" for a in flags)
    formatter = parser._get_formatter()
    for action in flags:
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        assert action.required or "(default:" in formatter._get_help_string(action), action.option_strings[0]


def _raises(error: BaseException):
    def handler(_: argparse.Namespace) -> int:
        raise error

    return handler


def test_user_errors_are_one_line_and_exit_1(capsys):
    args = argparse.Namespace(handler=_raises(MissingInput("input not found: x.jpg\nmore detail")), debug=False)
    assert execute("smearscope run", args) == 1
    assert capsys.readouterr().err == "smearscope run: error: input not found: x.jpg\n"


def test_debug_shows_the_user_errors_traceback():
    args = argparse.Namespace(handler=_raises(MissingInput("input not found: x.jpg")), debug=True)
    with pytest.raises(MissingInput):
        execute("smearscope run", args)


def test_other_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        execute("smearscope run", argparse.Namespace(handler=_raises(ZeroDivisionError()), debug=False))


def test_first_line_skips_blank_lines_and_cuts():
    assert first_line("\n  boom: bad thing  \nsecond", 8) == "boom: ba"
    assert first_line("") == ""


@pytest.mark.parametrize("entry", [["batch/run.py"], ["-m", "export"], ["-m", "smearscope", "run"]])
def test_module_entry_points_share_the_subcommands_flags(entry):
    result = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--debug" in result.stdout


def test_script_entry_point_reports_a_missing_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "batch/run.py", "--input", str(tmp_path / "absent.jpg"), "--output",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"batch/run.py: error: input not found: {tmp_path / 'absent.jpg'}"]
