"""`smearscope bench batch`: the end-to-end job beside the bare models, in one run, on real smear fields.

Measured here, each in a process of its own (so each peak RSS is its own):
- the CPU cost of each stage of a field, in core-milliseconds per cell (decode, find, crop, stain);
- the shipped model (the repository's 1/model.onnx) and ONNX Runtime FP32 in-process, on those crops;
- the reference tutorial's loop (Keras `model.predict`, one image per call; speed does not depend on weights);
- `smearscope run` end to end with the embedded Triton, its start-up apart from its steady rate.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from batch import storage
from batch.driver import BatchOptions
from batch.field import FieldSettings
from cells.contract import IMAGE_SUFFIXES, MODEL_NAME, REQUEST_BATCH_SIZE

# The targets, as ratios measured in this run.
TARGETS = {"job_vs_served_classifier": 0.8, "job_vs_shipped": 0.8, "job_vs_fp32": 1.6, "job_vs_tutorial": 15.0, "shipped_vs_fp32": 2.5,
           "job_vs_baseline_runtime": 1.3}


@dataclass(frozen=True)
class BenchOptions:
    fields: Path
    repository: Path
    out: Path
    max_fields: int = 20
    threads: int = 2
    batch_size: int = REQUEST_BATCH_SIZE
    tutorial_images: int = 48
    name: str = MODEL_NAME
    finder: str = FieldSettings().finder  # the job's, and the one whose cost the "find" stage measures
    worker_cpus: float = BatchOptions.worker_cpus  # the job's `--worker-cpus`
    runtime: str = BatchOptions.server_runtime  # the job's `--runtime`
    baseline_runtime: str = "onnxruntime"  # the job run again with this `--runtime`, in the same run ("": not)
    crops: str = BatchOptions.server_crops  # the job's `--crops`


def cpu_model_name() -> str:
    """lscpu's model name, from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def field_paths(fields: Path, max_fields: int) -> list[Path]:
    from cells.errors import BadInput

    paths = sorted(p for p in Path(fields).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_fields]
    if not paths:
        raise BadInput(f"no field images in {fields}")
    return paths


def _stage_costs(paths: list[Path], crops_file: Path, finder: str, repository: Path, threads: int,
                 graph_threads: int | None = None) -> dict:
    """Run each stage of the field model's work on every field; core-ms per cell of each. The models
    run in-process (ONNX Runtime) here, in Triton in the job. With the learned finder, the crop graph
    (export/crop_graph.py) also runs on the same cells, on `graph_threads` (default `threads`),
    reported apart (`graph_core_ms_per_cell`): it replaces the crop and stain stages where a server runs it."""
    from cells.contract import CROPS_NAME, DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT
    from cells.detect import detector_input, labelled_cells
    from cells.find import cell_crops
    from cells.repository import served_onnx
    from cells.runtime import OnnxGraph, OnnxModel
    from cells.stain import normalise_stain
    from fields.pipeline import crop_graph_inputs
    from fields.slides import decode, find_classical

    learned = finder == "learned"
    spent = dict.fromkeys(("decode", "find", "crop", "stain"), 0.0)
    finding = dict.fromkeys(("detector input", "detector", "post-processing", "graph"), 0.0)  # the learned finder's parts
    if learned:
        detector = OnnxModel(served_onnx(repository, DETECTOR_NAME), batch_size=1, threads=threads,
                             input_name=DETECTOR_INPUT, output_name=DETECTOR_OUTPUT)
        graph_file = served_onnx(repository, CROPS_NAME)
        graph = OnnxGraph(graph_file, threads if graph_threads is None else graph_threads) if graph_file.is_file() else None
    all_crops = []

    def timed(stage: str, work, *args, into: dict = spent):
        started = time.process_time()
        result = work(*args)
        into[stage] += time.process_time() - started
        return result

    for path in paths:
        image = timed("decode", decode, path.read_bytes())
        if learned:
            small, factor = timed("detector input", detector_input, image, into=finding)
            maps = timed("detector", detector, small[None], into=finding)[0]
            found, labels, ids = timed("post-processing", labelled_cells, maps, image.shape[:2], factor, into=finding)
            spent["find"] = sum(v for k, v in finding.items() if k != "graph")
        else:
            found = timed("find", find_classical, image)
        crops = timed("crop", cell_crops, image, found)
        all_crops.append(timed("stain", normalise_stain, crops))
        if learned and graph is not None and found:
            timed("graph", graph, crop_graph_inputs(image, found, labels, ids, factor), into=finding)
    crops = np.concatenate(all_crops)
    np.save(crops_file, crops)
    per_cell = {k: 1000 * v / len(crops) for k, v in finding.items()}
    return {"cells": int(len(crops)), "core_ms_per_cell": {k: 1000 * v / len(crops) for k, v in spent.items()},
            "find_core_ms_per_cell": per_cell if learned else None,
            "graph_core_ms_per_cell": per_cell["graph"] if learned and graph is not None else None}


def rate(predict, images: np.ndarray, batch_size: int) -> dict:
    predict(images[:batch_size])  # warm-up: first calls allocate and pick kernels
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(images), batch_size):
        predict(images[start : start + batch_size])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images": int(len(images)), "images_per_s": len(images) / wall, "core_ms_per_image": 1000 * cpu / len(images)}


def _onnx_rate(model: Path, crops_file: Path, threads: int, batch_size: int) -> dict:
    from cells.runtime import OnnxModel

    classifier = OnnxModel(model, batch_size=batch_size, threads=threads)
    return rate(classifier, np.load(crops_file), batch_size)


def _served_rate(repository: Path, name: str, runtime: str, crops_file: Path, threads: int, batch_size: int) -> dict:
    """The classifier as the job's server runs it (the runtime `runtime` resolves to, its model file,
    the server's batch split), in-process on the same crops."""
    from cells.repository import runtime_model
    from cells.runtime import RUNTIMES, choose_runtime

    chosen = choose_runtime(repository, name, runtime)
    throughput = {"throughput": True} if chosen == "openvino" else {}
    path = runtime_model(repository, name, chosen)
    result = rate(RUNTIMES[chosen](path, batch_size=batch_size, threads=threads, **throughput), np.load(crops_file), batch_size)
    return {**result, "runtime": chosen, "model": str(path)}


def _tutorial_rate(crops_file: Path, threads: int, images: int) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    from train.model import build_model

    model = build_model("none")
    crops = np.load(crops_file)[:images]
    return rate(lambda batch: [model.predict(image[None], verbose=0) for image in batch], crops, 1)


def _child(function, arguments: tuple, results) -> None:
    import resource

    result = function(*arguments)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results.put(result)


def in_child(function, *arguments, one_blas_thread: bool = False) -> dict:
    """`function(*arguments)` in a fresh process; its result with that process's peak RSS.

    `one_blas_thread`: NumPy's BLAS on one thread, as Ray starts its workers (OMP_NUM_THREADS=1);
    with a thread a core, the per-field work's tiny matrix products cost twice the CPU (spinning).
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(function, arguments, results))
    saved = os.environ.get("OMP_NUM_THREADS")
    if one_blas_thread:
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        process.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    result = results.get()
    process.join()
    return result


def _processes() -> dict[int, tuple[int, str, int, float]]:
    """Every process: pid -> (parent pid, name, resident bytes, CPU seconds so far), from /proc."""
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        if name.startswith("python"):
            name = _python_role(stat.parent / "cmdline", name)
        found[int(stat.parent.name)] = (int(fields[1]), name, int(fields[21]) * page, (int(fields[11]) + int(fields[12])) / ticks)
    return found


def _python_role(cmdline: Path, name: str) -> str:
    """A Python process of the job by what it runs: the driver, the embedded Triton's model, or itself."""
    try:
        arguments = cmdline.read_bytes().split(b"\0")
    except OSError:
        return name
    for role, marker in (("smearscope run (driver)", b"run"), ("smearscope serve (the models)", b"serve")):
        if b"smearscope" in arguments and marker in arguments:
            return role
    return name


def _tree(pid: int, processes: dict) -> set[int]:
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [c for c, info in processes.items() if info[0] == parent and c not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def job(paths: list[Path] | list[str], options: BenchOptions, output: Path | str) -> dict:
    """`smearscope run` on the fields with the embedded Triton; wall, start-up, steady rate, peak RSS of its
    processes together and by process name."""
    command = [sys.executable, "-m", "smearscope", "run", "--input", *map(str, paths), "--output", str(output),
               "--repository", str(options.repository), "--model", options.name, "--batch-size", str(options.batch_size),
               "--finder", options.finder, "--worker-cpus", str(options.worker_cpus),
               "--runtime", options.runtime, "--crops", options.crops]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    cpu: dict[int, tuple[str, float]] = {}  # pid -> (name, CPU seconds at its last sample)
    rss: dict[int, int] = {}  # pid -> its peak resident bytes
    series: list[tuple[float, float]] = []  # (time, CPU seconds of the processes alive then)
    by_name: list[dict[str, float]] = []  # CPU seconds so far by process name, at each time of `series`
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.25):
            processes = _processes()
            tree = [p for p in _tree(process.pid, processes) if p in processes]
            peak = max(peak, sum(processes[p][2] for p in tree) / 2**20)
            series.append((time.monotonic(), sum(processes[p][3] for p in tree)))
            for p in tree:  # a bare "python" name is kept only until a better one is seen (Ray renames its
                name = processes[p][1]  # workers after start; an exiting process's cmdline reads empty)
                cpu[p] = (cpu[p][0] if p in cpu and name.startswith("python") else name, processes[p][3])
                rss[p] = max(rss.get(p, 0), processes[p][2])
            by_name.append(_sum_by_name(cpu))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log, _ = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"smearscope run failed ({process.returncode}): {log[-2000:]}")
    report = json.loads(storage.read_bytes(storage.join(output, "run.json")))
    by_process: dict[str, float] = {}
    rss_by_process: dict[str, float] = {}
    for pid, (name, seconds) in cpu.items():
        by_process[name] = by_process.get(name, 0.0) + seconds
        rss_by_process[name] = rss_by_process.get(name, 0.0) + rss.get(pid, 0) / 2**20
    cells = max(report["cells_this_run"], 1)
    return {
        # CPU of the job's processes over the whole run (start-up included), core-ms per cell, by process name.
        "core_ms_per_cell_by_process": {name: 1000 * s / cells for name, s in sorted(by_process.items(), key=lambda x: -x[1])},
        "cells": report["cells_this_run"],
        "fields": report["fields_processed_this_run"],
        "input_bytes_read_by_workers": report["input_bytes_read_by_workers"],
        "wall_s": report["wall_seconds"],
        "startup_s": report["startup_seconds"],
        "cells_per_s": report["cells_per_second"],
        "steady_cells_per_s": report["steady_cells_per_second"],
        "peak_rss_mib": peak,
        # Each process's own peak, summed by name (Ray's workers peak at different times).
        "peak_rss_mib_by_process": dict(sorted(rss_by_process.items(), key=lambda x: -x[1])),
        "steady_busy_cores": _steady_busy(series),
        # The middle half of the run (start-up, the last fields and the tables left out), by process name.
        "steady_core_ms_per_cell_by_process": _steady_by_name(series, by_name, report["steady_cells_per_second"]),
    }


def _sum_by_name(cpu: dict[int, tuple[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for name, seconds in cpu.values():
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


def _steady_by_name(series: list[tuple[float, float]], by_name: list[dict[str, float]], cells_per_s: float) -> dict:
    """Core-ms per cell of each process name over the middle half of the run, at its steady rate."""
    if len(series) < 8 or not cells_per_s:
        return {}
    first, last = len(series) // 4, 3 * len(series) // 4
    cells = cells_per_s * (series[last][0] - series[first][0])
    spent = {name: by_name[last].get(name, 0.0) - by_name[first].get(name, 0.0) for name in by_name[last]}
    return {name: 1000 * s / cells for name, s in sorted(spent.items(), key=lambda x: -x[1]) if s > 0}


def _steady_busy(series: list[tuple[float, float]]) -> float:
    """The share of the cores the job's processes used over the middle half of the run (start-up,
    the last slides and the tables left out): CPU seconds over wall seconds times cores."""
    if len(series) < 8:
        return float("nan")
    start, end = series[len(series) // 4], series[3 * len(series) // 4]
    return (end[1] - start[1]) / ((end[0] - start[0]) * len(os.sched_getaffinity(0)))


def bench_batch(options: BenchOptions) -> dict:
    from cells.repository import engine_source, served_onnx
    from export.cpu_model import upcast_to_fp32

    paths = field_paths(options.fields, options.max_fields)
    with tempfile.TemporaryDirectory(prefix="smearscope-bench-") as scratch:
        scratch = Path(scratch)
        crops_file = scratch / "crops.npy"
        stages = in_child(_stage_costs, paths, crops_file, options.finder, options.repository, options.threads,
                          one_blas_thread=True)
        print(f"{len(paths)} fields, {stages['cells']} cells; per cell (core-ms): "
              + ", ".join(f"{k} {v:.2f}" for k, v in stages["core_ms_per_cell"].items()), flush=True)
        fp32_model = upcast_to_fp32(engine_source(options.repository, options.name), scratch / "model.fp32.onnx")
        shipped_model = served_onnx(options.repository, options.name)
        shipped = in_child(_onnx_rate, shipped_model, crops_file, options.threads, options.batch_size)
        print(f"shipped model in-process: {shipped['images_per_s']:.1f} img/s", flush=True)
        served = in_child(_served_rate, options.repository, options.name, options.runtime, crops_file, options.threads,
                          options.batch_size)
        print(f"served classifier in-process ({served['runtime']}, {served['model']}): {served['images_per_s']:.1f} img/s",
              flush=True)
        fp32 = in_child(_onnx_rate, fp32_model, crops_file, options.threads, options.batch_size)
        print(f"ONNX Runtime FP32 in-process: {fp32['images_per_s']:.1f} img/s", flush=True)
        tutorial = in_child(_tutorial_rate, crops_file, options.threads, options.tutorial_images)
        print(f"tutorial loop (Keras predict, one image per call): {tutorial['images_per_s']:.1f} img/s", flush=True)
        runtimes = [options.runtime] + ([options.baseline_runtime] if options.baseline_runtime not in ("", options.runtime) else [])
        jobs = {}
        for runtime in runtimes:
            jobs[runtime] = job(paths, replace(options, runtime=runtime), scratch / f"run-{runtime}")
            print(f"smearscope run --runtime {runtime}: {jobs[runtime]['steady_cells_per_s']:.1f} cells/s steady, "
                  f"start-up {jobs[runtime]['startup_s']:.1f} s", flush=True)
    end_to_end = jobs[options.runtime]
    steady = end_to_end["steady_cells_per_s"]
    ratios = {
        "job_vs_served_classifier": steady / served["images_per_s"],
        "job_vs_shipped": steady / shipped["images_per_s"],
        "job_vs_fp32": steady / fp32["images_per_s"],
        "job_vs_tutorial": steady / tutorial["images_per_s"],
        "shipped_vs_fp32": shipped["images_per_s"] / fp32["images_per_s"],
    }
    if len(jobs) > 1:
        ratios["job_vs_baseline_runtime"] = steady / jobs[options.baseline_runtime]["steady_cells_per_s"]
    cores = len(os.sched_getaffinity(0))
    stage_total = sum(stages["core_ms_per_cell"].values()) + shipped["core_ms_per_image"]
    result = {
        "cpu": cpu_model_name(),
        "cores": cores,
        "threads": options.threads,
        "fields": len(paths),
        "shipped_model": str(shipped_model),
        "stages": stages,
        "shipped": shipped,
        "served_classifier": served,
        "onnx_fp32": fp32,
        "tutorial": tutorial,
        "runtime": options.runtime,
        "job": end_to_end,
        "baseline_runtime": options.baseline_runtime if len(jobs) > 1 else None,
        "job_baseline": jobs.get(options.baseline_runtime) if len(jobs) > 1 else None,
        "ratios": ratios,
        "targets": TARGETS,
        # What the job spends per cell beyond its stages (Ray, Triton transport, the driver, idle cores).
        "job_core_ms_per_cell": 1000 * cores / steady,
        # CPU the job's processes used over its middle half, per cell (measured, not assumed busy).
        "job_steady_core_ms_per_cell": sum(end_to_end["steady_core_ms_per_cell_by_process"].values()),
        "stages_core_ms_per_cell": stage_total,
    }
    write_reports(result, options.out)
    return result


def markdown(result: dict) -> str:
    stages = result["stages"]["core_ms_per_cell"]
    lines = [
        f"CPU: {result['cpu']} ({result['cores']} cores, {result['threads']} inference threads); "
        f"{result['fields']} fields, {result['stages']['cells']} cells",
        "",
        "| ratio (this run) | measured | target |",
        "| --- | --- | --- |",
        *(f"| {name} | {value:.2f} | {result['targets'][name]:g} |" for name, value in result["ratios"].items()),
        "",
        "| way of classifying | cells/s | core-ms per cell | peak RSS MiB |",
        "| --- | --- | --- | --- |",
        *(f"| `smearscope run --runtime {runtime}` end to end, steady (start-up {run['startup_s']:.1f} s apart) | "
          f"{run['steady_cells_per_s']:.1f} | {1000 * result['cores'] / run['steady_cells_per_s']:.2f} | {run['peak_rss_mib']:.0f} |"
          for runtime, run in ((result["runtime"], result["job"]), (result["baseline_runtime"], result["job_baseline"]))
          if run is not None),
        *(f"| {label} | {result[key]['images_per_s']:.1f} | {result[key]['core_ms_per_image']:.2f} | {result[key]['peak_rss_mib']:.0f} |"
          for key, label in (("served_classifier", "the classifier the server runs, in-process"),
                             ("shipped", "shipped model, in-process"), ("onnx_fp32", "ONNX Runtime FP32, in-process"),
                             ("tutorial", "tutorial loop (Keras predict, one image a call)"))),
        "",
        "| stage (in-process, one core) | core-ms per cell |",
        "| --- | --- |",
        *(f"| {stage} | {cost:.2f} |" for stage, cost in stages.items()),
        f"| inference (shipped model) | {result['shipped']['core_ms_per_image']:.2f} |",
        f"| sum of the stages | {result['stages_core_ms_per_cell']:.2f} |",
        f"| the job, all cores over its steady rate | {result['job_core_ms_per_cell']:.2f} |",
        "",
        "| the job's processes (whole run, start-up included) | CPU core-ms per cell |",
        "| --- | --- |",
        *(f"| `{name}` | {cost:.2f} |" for name, cost in result["job"]["core_ms_per_cell_by_process"].items() if cost >= 0.05),
        "",
        "| the models' server (`smearscope serve`), peak RSS MiB | |",
        "| --- | --- |",
        *(f"| `--runtime {runtime}` | {run['peak_rss_mib_by_process'].get('smearscope serve (the models)', 0):.0f} |"
          for runtime, run in ((result["runtime"], result["job"]), (result["baseline_runtime"], result["job_baseline"]))
          if run is not None),
    ]
    return "\n".join(lines) + "\n"


def write_reports(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
