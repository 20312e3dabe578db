"""The batch job's driver: plans, schedules and resumes; `batch/run.py` and `smearscope run` start it.

One Ray task per slide (batch/workers.py) takes it whole: decode, find cells, crop, stain and
classify through the worker's own Triton client (batch/field.py, the function the web page uses
too), and writes the slide's part to the output atomically. The driver only plans, schedules
slides with bounded concurrency and counts what comes back (a few numbers a slide, not its cells);
a resumed run skips slides whose part exists, so each is written once. The tables are assembled
from the parts at the end, a slide at a time.
"""
from __future__ import annotations

import asyncio
import json
import os
import pickle
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from batch.field import FieldSettings, decided, settings_served
from batch.inputs import DEFAULT_MAX_BYTES, Slide, expand, iter_slides, plan, slide_name
from batch.overlay import overlay_path
from batch.grouping import Grouping
from batch.results import MIN_CELLS, Tables, failed, finished_keys, write_part, write_tables
from batch.storage import StorageUnavailable, absolute, atomic_path, atomic_write, join, make_output, relative, resolve
from batch.wsi import Tile, deduplicate_seams, slide_of_tile
from batch.workers import WORKER_RETRIES, Outcome, Shared
from cells.contract import MAX_IN_FLIGHT, MODEL_NAME, REQUEST_BATCH_SIZE
from cells.errors import describe
from cells.decision import CALLS
from cells.stopping import Interrupted, StopSignals, exit_code
from cells.repository import DEFAULT_REPOSITORY
from deploy.client import ClientOptions, RequestTally

PROGRESS_EVERY_S = 10.0


@dataclass
class BatchOptions:
    """The batch job's settings; `smearscope run --help` documents each (batch/commands.py)."""

    inputs: list[str]  # paths, globs, s3:// keys, prefixes or patterns
    output: str  # a folder or an s3:// prefix
    triton_urls: tuple[str, ...] = ()  # empty: start an embedded Triton on `repository`
    protocol: str = "grpc"
    model: str = MODEL_NAME
    repository: Path = DEFAULT_REPOSITORY
    server_threads: int = 0  # inference threads of the embedded Triton; 0: one per core
    server_runtime: str = "auto"  # the embedded Triton's CPU runtime (cells.runtime)
    server_crops: str = "numpy"  # how the embedded Triton's field model cuts crops (fields.pipeline.CROP_ENGINES)
    batch_size: int = REQUEST_BATCH_SIZE
    max_in_flight: int = MAX_IN_FLIGHT
    max_pending: int = 0  # slides in flight at once; 0: two per task slot of the cluster
    worker_cpus: float = 0.5  # CPUs each slide's task reserves: two in flight a core (bench feed: 66 % busy at 1, 98 % at 0.5)
    triton_policy: str = "round-robin"  # or "first-up": the first URL that answers takes every request
    ray_address: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    settings: FieldSettings = field(default_factory=FieldSettings)  # how each field is read and its cells found
    overlays: bool = False
    overwrite: bool = False
    grouping: Grouping = field(default_factory=Grouping)  # which slide each field belongs to
    min_cells: int = MIN_CELLS  # a slide's count is "enough" from this many red cells


@dataclass
class Progress:
    """Slides done/total, cells/s and errors, as a bar on a terminal and as lines in job logs."""

    total: int = 0
    done: int = 0
    errors: int = 0
    lost: int = 0
    cells: int = 0
    skipped: int = 0
    planned: bool = False  # every input listed and planned: `expected` is complete
    interrupted_said: bool = False
    expected: Counter = field(default_factory=Counter)  # fields (and tiles) each slide has, finished or not
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    bar: object = None

    def __post_init__(self) -> None:
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit="slide", desc="slides")

    def add(self, cells: int, error: bool = False, lost: bool = False) -> None:
        self.done += 1
        self.cells += cells
        self.errors += error
        self.lost += lost
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.set_postfix(cells=self.cells, errors=self.errors, refresh=False)
            self.bar.update(1)
        elif time.monotonic() - self.last_line >= PROGRESS_EVERY_S:
            self.print_line()

    def print_line(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        print(f"progress: {self.done}/{self.total or '?'} slides, {self.cells} cells, {self.cells / elapsed:.1f} cells/s, "
              f"{self.errors} errors, {self.lost} lost", flush=True)
        self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def say_interrupted(self, finished: int) -> None:
        """The one line an interrupted run prints (once, however many places notice); `finished`:
        the parts in the output now (workers still finishing may add a few more, each whole)."""
        if self.interrupted_said:
            return
        self.interrupted_said = True
        known = max(sum(self.expected.values()), finished)
        print(f"interrupted: {finished} of {'' if self.planned else 'at least '}{known} slides done; "
              "rerun the same command to resume", file=sys.stderr, flush=True)


@dataclass
class Placement:
    """Where the work went: slides and cells per Ray node, requests per Triton URL."""

    nodes: dict[str, dict] = field(default_factory=dict)
    tally: RequestTally = field(default_factory=RequestTally)
    worker_failures: int = 0
    bytes_received: int = 0  # what the driver took in from workers: the bound on one driver's throughput
    input_bytes_read: int = 0  # what the workers read of the inputs' files and objects
    started_cpu: float = field(default_factory=time.process_time)
    scheduling_cpu: float = 0.0  # the driver's CPU seconds from its first slide scheduled to its last done

    def finish(self) -> None:
        self.scheduling_cpu = time.process_time() - self.started_cpu

    def add(self, outcome: Outcome) -> None:
        self.bytes_received += len(pickle.dumps(outcome))
        self.input_bytes_read += outcome.bytes_read
        node = self.nodes.setdefault(outcome.node_id, {"address": outcome.node_address, "slides": 0, "cells": 0})
        node["slides"] += 1
        node["cells"] += outcome.cells
        self.tally.add(outcome.tally)

    def report(self, cells: int) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # this process only: not Ray's or Triton's
        return {
            "nodes": self.nodes, "triton_requests": self.tally.as_dict(), "worker_failures": self.worker_failures,
            "driver_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),  # start-up and tables included
            # Scheduling only: what bounds the cells/s one driver can take.
            "driver_cpu_ms_per_cell": round(1000 * self.scheduling_cpu / max(cells, 1), 4),
            "driver_bytes_per_cell": round(self.bytes_received / max(cells, 1), 2),
            "input_bytes_read_by_workers": self.input_bytes_read,
            # What the workers sent to Triton (input tensors as sent, answered requests): the wire's cost.
            "wire_bytes_per_cell": round(self.tally.bytes_sent / max(cells, 1), 1),
        }


async def process(options: BatchOptions, urls: list[str], progress: Progress,
                  stop: StopSignals) -> tuple[Placement, str, FieldSettings]:
    """Send slides to Ray tasks with bounded concurrency; write each finished slide at once.

    A stop signal cancels this coroutine: nothing more is scheduled and slides in flight are
    abandoned (their Ray tasks end with the driver; one that finishes first writes its part whole).
    Returns where the work went, the model version the servers reported, and the settings used (the
    classical finder where no detector was served).
    """
    import ray
    from ray.exceptions import RayError, RayTaskError

    from batch.workers import remote_analyse_slide

    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    stop.on_stop(lambda: loop.is_closed() or loop.call_soon_threadsafe(main.cancel))

    client_options = ClientOptions(tuple(urls), protocol=options.protocol, model=options.model,
                                   batch_size=options.batch_size, max_in_flight=options.max_in_flight,
                                   policy=options.triton_policy)
    settings, fallback = await settings_served(options.settings, client_options)
    if fallback:
        print(f"warning: no detector served ({fallback}): finding cells with the classical finder", flush=True)
    analyse = remote_analyse_slide(options.worker_cpus)
    output = options.output  # absolute (_run): the workers write there, the same location on every node
    shared_ref = ray.put(Shared(client_options, options.overlays, options.max_bytes, output))
    settings_ref = ray.put(settings)
    cpus = max(1.0, ray.cluster_resources().get("CPU", 1.0))
    gate = asyncio.Semaphore(options.max_pending or max(2, int(2 * cpus / options.worker_cpus)))
    done = set() if options.overwrite else finished_keys(output)
    placement = Placement()
    model_versions: set[str] = set()

    async def handle(slide: Slide | Tile, unit_settings: FieldSettings) -> None:
        """One field or tile: its worker writes its part; the driver writes one only when no worker could."""
        result = None
        try:
            if slide.error:
                result = failed(slide.slide_id, slide.source, slide.error)
            else:
                unit_ref = settings_ref if unit_settings is settings else unit_settings
                outcome = await analyse.remote(slide, shared_ref, unit_ref)
                placement.add(outcome)
                if outcome.storage_down:  # every other slide would wait out the same retries: stop, resumably
                    raise StorageUnavailable(slide.slide_id, outcome.lost.split(": ", 1)[-1])
                if outcome.lost:
                    print(f"lost {slide.slide_id}: {outcome.lost}", file=sys.stderr, flush=True)
                    progress.add(0, lost=True)
                else:
                    if outcome.model_version:
                        model_versions.add(outcome.model_version)
                    progress.add(outcome.cells, error=outcome.error)
        except RayTaskError as error:  # a bug in the worker's code: this slide fails, not the run
            result = failed(slide.slide_id, slide.source, f"internal error: {describe(error.cause or error, 160)}")
        except RayError as error:  # its worker or node died on every try
            placement.worker_failures += 1
            result = failed(slide.slide_id, slide.source,
                            f"worker lost {WORKER_RETRIES + 1} times processing it: {describe(error, 120)}")
        finally:
            gate.release()
        if result is not None:
            write_part(output, slide.key, result)
            progress.add(0, error=True)

    pending: set[asyncio.Task] = set()  # only those in flight: memory does not grow with the inputs
    failures: list[BaseException] = []

    def finished(task: asyncio.Task) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())

    for item in iter_slides(options.inputs, options.max_bytes):
        if failures:
            break
        for unit, unit_settings in await asyncio.to_thread(plan, item, settings, options.max_bytes):
            progress.expected[options.grouping.slide_of(unit.slide_id)] += 1
            if unit.key in done:
                progress.skipped += 1
                continue
            progress.total += 1
            await gate.acquire()
            task = asyncio.create_task(handle(unit, unit_settings))
            pending.add(task)
            task.add_done_callback(finished)
    progress.planned = not failures
    await asyncio.gather(*pending, return_exceptions=True)
    placement.finish()
    if failures:  # the driver's own failure (writing a part, say): the run stops, its parts stay
        raise failures[0]
    return placement, ",".join(sorted(model_versions)), settings


def _start_ray(address: str | None) -> None:
    import ray

    from deploy.server import free_port

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for variable in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):
        os.environ.setdefault(variable, str(free_port()))
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=True)


def write_overviews(output: str, tables: Tables) -> dict[str, str]:
    """For each whole-slide image, a downsampled PNG with its cells drawn; {slide: path in output}."""
    import pyarrow.parquet as pq
    from PIL import Image

    from batch.overlay import overview

    written = {}
    filesystem, cells_path = resolve(join(output, "cells.parquet"))
    for slide in sorted({row["slide"] for row in tables.fields if slide_of_tile(row["field"])}):
        cells = pq.read_table(cells_path, filesystem=filesystem, filters=[("slide", "=", slide)]).to_pylist()
        path = overlay_path(output, Slide(slide, slide))
        with atomic_path(path) as temporary:
            Image.fromarray(overview(slide, cells)).save(temporary, format="PNG")
        written[slide] = relative(path, output)
    return written


def summary_table(slides: list[dict]) -> str:
    """Per slide: fields, cells, parasitized, parasitemia with its 95 % interval, whether enough cells
    were counted and the call; unreadable fields named."""
    lines = [f"{'slide':<40} {'fields':>6} {'cells':>6} {'parasitized':>11} {'parasitemia %':>13} {'95% CI':>15}  "
             f"enough  call"]
    for row in slides:
        name = slide_name(row["slide"])[-40:]
        if row["status"] == "ok":
            interval = f"{row['ci_low_pct']:.2f}-{row['ci_high_pct']:.2f}"
            lines.append(f"{name:<40} {row['fields_ok']:>6} {row['cells']:>6} {row['parasitized']:>11} "
                         f"{row['parasitemia_pct']:>13.2f} {interval:>15}  {'yes' if row['enough_cells'] else 'no':<6}  "
                         f"{row['call']}")
        if row["errors"]:
            lines.append(f"{name:<40} error: {row['errors'][:100]}")
    return "\n".join(lines)


def run(options: BatchOptions) -> int:
    """Start what is missing (Ray, Triton), process, write tables and run.json; exit code for the caller.

    SIGINT or SIGTERM, however the process was started: stop scheduling, abandon the slides in
    flight, stop the embedded Triton and Ray, say how far the run got and exit 130 or 143. Finished
    parts stay, so the same command resumes; the tables are written only by a run that finished.
    """
    stop = StopSignals().install()
    progress = Progress()
    try:
        return _run(options, progress, stop)
    except (Interrupted, asyncio.CancelledError):
        if not stop.stopped:
            raise
        progress.say_interrupted(len(finished_keys(options.output)))
        return exit_code(stop.signum)
    finally:
        progress.close()


def _run(options: BatchOptions, progress: Progress, stop: StopSignals) -> int:
    import ray

    from deploy.server import EmbeddedServer

    started = time.monotonic()
    options = replace(options, output=absolute(options.output))
    make_output(options.output)
    expand(options.inputs)  # fail fast on inputs that do not exist
    settings, decision = decided(options.settings, options.repository, options.model)
    options = replace(options, settings=settings)
    server = None if options.triton_urls else EmbeddedServer(options.repository, threads=options.server_threads,
                                                                 runtime=options.server_runtime, crops=options.server_crops)
    urls = list(options.triton_urls) or [server.grpc_url if options.protocol == "grpc" else server.http_url]
    try:
        with stop.raising():
            if server is not None:
                server.start()
                print(f"embedded Triton on grpc {server.grpc_url} (model {options.model} from {options.repository})",
                      flush=True)
            _start_ray(options.ray_address)
            stop.install()  # again: Ray's core worker replaces the SIGTERM handler with its own, which aborts
        startup = time.monotonic() - started  # Triton and Ray ready: what every run pays before its first slide
        placement, model_version, settings = asyncio.run(process(options, urls, progress, stop))
    finally:
        if stop.stopped:  # say it now: `ray job stop` SIGKILLs a driver still stopping after 3 s
            progress.say_interrupted(len(finished_keys(options.output)))
        if server is not None:
            server.terminate()  # it takes seconds to unload: let it while Ray shuts down
        if ray.is_initialized():
            ray.shutdown()
        if server is not None:
            server.stop()
    with stop.raising():
        tables = write_tables(options.output, options.grouping.slide_of, options.min_cells, progress.expected, decision,
                              tidy=deduplicate_seams)
        overviews = write_overviews(options.output, tables) if options.overlays else {}
        wall = time.monotonic() - started
        fields, ok = len(tables.fields), sum(row["status"] == "ok" for row in tables.fields)
        report = {
            "inputs": options.inputs,
            "output": str(options.output),
            "model": options.model,
            "model_version": model_version,
            "triton_urls": urls,
            "protocol": options.protocol,
            "embedded_triton": server is not None,
            **{name: getattr(settings, name) for name in ("stain_normalise", "finder", "cell_diameter", "threshold")},
            "threshold_validated_on": decision.validated_on,
            "decision_rule": decision.describe(),
            "calls": {call: sum(row["call"] == call for row in tables.slides) for call in CALLS},
            "group": options.grouping.mode,
            "slides": len(tables.slides),
            "slides_with_enough_cells": sum(row["enough_cells"] for row in tables.slides),
            "min_cells": options.min_cells,
            "fields": fields,
            "fields_ok": ok,
            "fields_error": fields - ok,
            "fields_processed_this_run": progress.done - progress.lost,
            "fields_skipped_as_finished": progress.skipped,
            "fields_lost": progress.lost,
            "cells": tables.cells,
            "cells_this_run": progress.cells,
            "wall_seconds": round(wall, 2),
            "startup_seconds": round(startup, 2),
            "cells_per_second": round(progress.cells / wall, 2),
            "steady_cells_per_second": round(progress.cells / max(wall - startup, 1e-9), 2),
            "fields_per_second": round((progress.done - progress.lost) / wall, 3),
            **placement.report(progress.cells),
            "slides_complete": sum(row["complete"] for row in tables.slides),
            "overviews": overviews,
        }
        atomic_write(join(options.output, "run.json"), json.dumps(report, indent=2))
    print(summary_table(tables.slides))
    print(f"{len(tables.slides)} slides of {fields} fields ({ok} ok, {fields - ok} error, {progress.lost} lost), "
          f"{tables.cells} cells; this run: {progress.done - progress.lost} fields in {wall:.1f}s, "
          f"{report['cells_per_second']} cells/s. Results in {options.output}", flush=True)
    if progress.lost or ok == 0:
        return 1
    return 0

