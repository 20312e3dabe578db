"""`smearscope bench feed`: what the pipeline around the models costs, with the models' compute taken out.

The whole job as it runs (`smearscope run`: Ray workers sending each field's bytes to the embedded
Triton's field model over gRPC, which decodes it, runs the detector, its post-processing and the
crop graph, and classifies; parts and tables written) on copies of real fields, served stand-in
models of the same contracts (bench/stand_in.py) for the detector and the classifier: the rate at
which this machine's CPUs could feed a GPU. Reported: cells/s, CPU core-ms per cell over all of the
job's processes and by process, over the run and in its steady middle half, the host's share
(everything but the crop graph, which a GPU host runs on the GPU) by component, the crop graph's
own CPU beside it, the bytes per cell the workers send to Triton, how busy the cores were, the
per-field stages in one process, and the driver's CPU and bytes per cell.
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
    crops: str = "graph"  # the job's `--crops`: the crop graph, as a GPU host runs it (there, on the GPU)


# Process names (bench.batch._python_role, /proc's comm) by the part of the system they are.
SERVER_PROCESSES = ("smearscope serve", "tritonserver", "triton_python_b")
RAY_WORKERS = ("ray::",)
DRIVER_PROCESSES = ("smearscope run",)


def host_components(by_process: dict[str, float], stages: dict[str, float], graph: float) -> dict[str, float]:
    """Host core-ms per cell by component: the server's per-field stages measured in-process (decode,
    the detector's input resize, its post-processing), the rest of the server (request handling, the
    stand-in models, the field model's Python), the Ray workers, the driver, and Ray's own processes;
    the crop graph's CPU taken out of the server (on a GPU host it runs on the GPU)."""
    def total(prefixes: tuple[str, ...]) -> float:
        return sum(v for name, v in by_process.items() if name.startswith(prefixes))

    measured = {"decode": stages["decode"], "detector input": stages["detector input"],
                "post-processing": stages["post-processing"]}
    server = total(SERVER_PROCESSES) - graph
    workers, driver = total(RAY_WORKERS), total(DRIVER_PROCESSES)
    ray = sum(by_process.values()) - total(SERVER_PROCESSES) - workers - driver
    return {**measured, "request handling and the rest of the server": server - sum(measured.values()),
            "Ray workers (read, send, write the part)": workers, "driver": driver, "Ray's own processes": ray}


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
        # The stages on one core each; the crop graph on as many threads as the job's server gives it (all cores).
        stages = in_child(_stage_costs, distinct, scratch / "crops.npy", "learned", repository, 1,
                          BatchOptions.server_threads, one_blas_thread=True)
        # ONNX Runtime serves the stand-ins: the detector's picks its recorded maps by exact pixel sums.
        run = job([inputs], BenchOptions(fields=inputs, repository=repository, out=options.out,
                                         worker_cpus=options.worker_cpus, runtime="onnxruntime", crops=options.crops),
                  scratch / "run")
        report = json.loads((scratch / "run" / "run.json").read_text())
    cores = len(os.sched_getaffinity(0))
    cpu_ms = sum(run["core_ms_per_cell_by_process"].values())
    steady = run["steady_core_ms_per_cell_by_process"]
    graph = (stages["graph_core_ms_per_cell"] or 0.0) if options.crops == "graph" else 0.0
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
        "crops": options.crops,
        # Steady state (the middle half of the run), every process: host = all of it but the crop graph's
        # own CPU, measured alone in-process on the same fields (the server's threads) and given beside it.
        "steady_core_ms_per_cell": sum(steady.values()),
        "steady_core_ms_per_cell_by_process": steady,
        "host_core_ms_per_cell": sum(steady.values()) - graph,
        "graph_core_ms_per_cell": stages["graph_core_ms_per_cell"],
        "host_core_ms_per_cell_by_component": host_components(steady, {**stages["core_ms_per_cell"],
                                                                       **stages["find_core_ms_per_cell"]}, graph),
        "wire_bytes_per_cell": report["wire_bytes_per_cell"],
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
