"""Shared fixtures: the committed real NIH cells and smear fields."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CELLS = FIXTURES / "cells"


@pytest.fixture(scope="session")
def cells_dir() -> Path:
    return CELLS


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real console entry point in a child process, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "smearscope", *args], capture_output=True, text=True, timeout=timeout
    )
