"""The batch job: `python batch/run.py --input ... --output ...` (also `smearscope run`, and `ray job submit`).

This file is the script (`ray job submit ... -- python batch/run.py`); the driver is batch/driver.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: the repository root on the path
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from batch.commands import configure_run
    from cells.cli import standalone

    raise SystemExit(standalone("batch/run.py", __doc__.splitlines()[0], configure_run))
