"""`smearscope bench feed`: what the pipeline around the models costs, with the models' compute taken out.

The whole job as it runs (`smearscope run`: Ray, the embedded Triton over gRPC, decode, the
detector's post-processing, crop, stain, the client, parts and tables written) on copies of real
fields, served stand-in models of the same contracts (bench/stand_in.py): the rate at which this
machine's CPUs could feed a GPU. Reported: cells/s, CPU core-ms per cell over all of the job's
processes and by process, how busy the cores were, the per-field stages in one process, and the
driver's CPU and bytes per cell.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.batch import BenchOptions, _stage_costs, cpu_model_name, field_paths, in_child, job
from batch.driver import BatchOptions
from cells.repository import DEFAULT_REPOSITORY


@dataclass(frozen=True)
class FeedBenchOptions:
    fields: Path = Path("tests/fixtures/smears")
    repository: Path = DEFAULT_REPOSITORY  # whose configs, decision rule and detector (recorded) are used
    out: Path = Path("bench/results/feed.json")
    distinct: int = 20  # distinct fields, in name order, the detector is recorded on
    total: int = 300  # fields the job runs: copies of the distinct ones
    worker_cpus: float = BatchOptions.worker_cpus  # the job's `--worker-cpus`


def bench_feed(options: FeedBenchOptions) -> dict:
    from bench.stand_in import stand_in_repository

    distinct = field_paths(options.fields, options.distinct)
    with tempfile.TemporaryDirectory(prefix="smearscope-feed-") as scratch:
        scratch = Path(scratch)
        repository = stand_in_repository(options.repository, distinct, scratch / "repository")
        inputs = scratch / "fields"
        inputs.mkdir()
        for index in range(options.total):
            source = distinct[index % len(distinct)]
            _place(source, inputs / f"{index:06d}-{source.name}")
        stages = in_child(_stage_costs, distinct, scratch / "crops.npy", "learned", repository, 1, one_blas_thread=True)
        # ONNX Runtime serves the stand-ins: the detector's picks its recorded maps by exact pixel sums.
        run = job([inputs], BenchOptions(fields=inputs, repository=repository, out=options.out,
                                         worker_cpus=options.worker_cpus, runtime="onnxruntime"), scratch / "run")
        report = json.loads((scratch / "run" / "run.json").read_text())
    cores = len(os.sched_getaffinity(0))
    cpu_ms = sum(run["core_ms_per_cell_by_process"].values())
    result = {
        "cpu": cpu_model_name(),
        "cores": cores,
        "fields": options.total,
        "distinct_fields": len(distinct),
        "cells": run["cells"],
        "cells_per_s": run["cells_per_s"],
        "steady_cells_per_s": run["steady_cells_per_s"],
        "startup_s": run["startup_s"],
        "wall_s": run["wall_s"],
        # All of the job's processes, start-up included, over every cell.
        "feed_core_ms_per_cell": cpu_ms,
        "core_ms_per_cell_by_process": run["core_ms_per_cell_by_process"],
        "worker_cpus": options.worker_cpus,
        # CPU used over CPU available: over the whole run, and over its middle half.
        "busy_cores": cpu_ms * run["cells"] / 1000 / (run["wall_s"] * cores),
        "steady_busy_cores": run["steady_busy_cores"],
        "stages_core_ms_per_cell": stages["core_ms_per_cell"],
        "driver_us_per_cell": 1000 * report["driver_cpu_ms_per_cell"],
        "driver_bytes_per_cell": report["driver_bytes_per_cell"],
        "peak_rss_mib": run["peak_rss_mib"],
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def _place(source: Path, target: Path) -> None:
    """A copy of a field: a hard link where the file system allows one."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)
