"""The batch job: `python batch/run.py --input ... --output ...` (also `smearscope run`, and `ray job submit`).

Ray core tasks decode images and find cells on CPU workers (one task per slide: large enough work
items that Ray's per-task overhead vanishes, and a corrupt file fails only its own task); the driver
streams each slide's crops to Triton through the project's asyncio client with a bounded number
of requests in flight, and writes each slide's result atomically as soon as it is classified.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (ray job submit ... python batch/run.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.inputs import Slide, expand, iter_slides, slide_name  # noqa: E402
from batch.overlay import overlay_path  # noqa: E402
from batch.results import classified, failed, finished_keys, read_parts, write_part, write_tables  # noqa: E402
from batch.slides import DEFAULT_MAX_PIXELS  # noqa: E402
from cells.contract import MAX_IN_FLIGHT, MODEL_NAME, REQUEST_BATCH_SIZE  # noqa: E402
from cells.errors import describe  # noqa: E402

PROGRESS_EVERY_S = 10.0
DEFAULT_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


@dataclass
class BatchOptions:
    """The batch job's settings; `smearscope run --help` documents each (batch/commands.py)."""

    inputs: list[str]
    output: Path
    triton_urls: tuple[str, ...] = ()  # empty: start an embedded Triton on `repository`
    protocol: str = "grpc"
    model: str = MODEL_NAME
    repository: Path = DEFAULT_REPOSITORY
    server_threads: int = 0  # ONNX Runtime threads of the embedded Triton; 0: one per core
    batch_size: int = REQUEST_BATCH_SIZE
    max_in_flight: int = MAX_IN_FLIGHT
    max_pending: int = 0  # slides being prepared at once; 0: two per CPU
    ray_address: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_border_cells: bool = False
    stain_normalise: bool = True
    overlays: bool = False
    overwrite: bool = False


@dataclass
class Progress:
    """Slides done/total, cells/s and errors, as a bar on a terminal and as lines in job logs."""

    total: int = 0
    done: int = 0
    errors: int = 0
    lost: int = 0
    cells: int = 0
    skipped: int = 0
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


def _prepare_remote():
    import ray

    from batch.slides import SlideError, prepare

    @ray.remote(num_cpus=1, max_retries=0)
    def prepare_slide(slide: Slide, max_pixels: int, keep_image: bool, keep_border: bool, stain_normalise: bool):
        """Returns SlideCells, or the one-line reason the slide cannot be processed."""
        try:
            data = slide.data if slide.data is not None else Path(slide.path).read_bytes()
            return prepare(data, max_pixels=max_pixels, keep_image=keep_image, keep_border=keep_border,
                           stain_normalise=stain_normalise)
        except (SlideError, OSError) as error:
            return str(error) if isinstance(error, SlideError) else f"unreadable file: {error.strerror or error}"

    return prepare_slide


async def process(options: BatchOptions, urls: list[str]) -> tuple[Progress, str]:
    """Stream slides through Ray workers and Triton; each finished slide is written at once.

    Returns the progress and the model version the server reported serving.
    """
    from batch.overlay import draw_overlay
    from deploy.client import ClientOptions, InferenceRejected, ServersUnavailable, TritonClassifier

    prepare_slide = _prepare_remote()
    output = options.output
    done = set() if options.overwrite else finished_keys(output)
    progress = Progress()
    max_pending = options.max_pending or 2 * max(1, int(os.cpu_count() or 1))
    gate = asyncio.Semaphore(max_pending)
    client_options = ClientOptions(tuple(urls), protocol=options.protocol, model=options.model,
                                   batch_size=options.batch_size, max_in_flight=options.max_in_flight)

    async def handle(slide: Slide, classifier: TritonClassifier) -> None:
        started = time.monotonic()
        try:
            if slide.error:
                result = failed(slide.slide_id, slide.source, slide.error)
            else:
                prepared = await prepare_slide.remote(slide, options.max_pixels, options.overlays,
                                                      options.keep_border_cells, options.stain_normalise)
                if isinstance(prepared, str):
                    result = failed(slide.slide_id, slide.source, prepared)
                else:
                    probabilities = await classifier.classify(prepared.crops)
                    result = classified(slide.slide_id, slide.source, prepared.boxes, prepared.areas, probabilities,
                                        prepared.width, prepared.height, time.monotonic() - started)
                    if options.overlays:
                        path = overlay_path(output, slide)
                        await asyncio.to_thread(draw_overlay, prepared.image, result.cell_rows, path)
                        result.overlay = str(path.relative_to(output))
        except (InferenceRejected, ServersUnavailable) as error:
            print(f"lost {slide.slide_id}: {error}", file=sys.stderr, flush=True)
            progress.add(0, lost=True)
            return
        except Exception as error:  # noqa: BLE001 - a worker crash fails this slide, not the run
            cause = getattr(error, "cause", None) or error  # a RayTaskError wraps the worker's exception
            result = failed(slide.slide_id, slide.source, f"internal error: {describe(cause, 160)}")
        finally:
            gate.release()
        write_part(output, slide.key, result)
        progress.add(result.cells, error=result.status == "error")

    skipped = 0
    async with TritonClassifier(client_options) as classifier:
        tasks = []
        for slide in iter_slides(options.inputs):
            if slide.key in done:
                skipped += 1
                continue
            progress.total += 1
            await gate.acquire()
            tasks.append(asyncio.create_task(handle(slide, classifier)))
        await asyncio.gather(*tasks)
    progress.close()
    progress.skipped = skipped
    return progress, classifier.model_version


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


def summary_table(results: list) -> str:
    lines = [f"{'slide':<48} {'status':<6} {'cells':>6} {'parasitized':>11} {'parasitemia %':>13}"]
    for result in sorted(results, key=lambda r: r.slide):
        name = slide_name(result.slide)
        if result.status == "ok":
            lines.append(f"{name[-48:]:<48} {'ok':<6} {result.cells:>6} {result.parasitized:>11} {result.parasitemia_pct:>13.2f}")
        else:
            lines.append(f"{name[-48:]:<48} {'error':<6} {result.error[:70]}")
    return "\n".join(lines)


def run(options: BatchOptions) -> int:
    """Start what is missing (Ray, Triton), process, write tables and run.json; exit code for the caller."""
    import ray

    from deploy.server import EmbeddedServer

    started = time.monotonic()
    options.output.mkdir(parents=True, exist_ok=True)
    expand(options.inputs)  # fail fast on inputs that do not exist
    server = None
    if not options.triton_urls:
        server = EmbeddedServer(options.repository, name=options.model, threads=options.server_threads).start()
        print(f"embedded Triton on grpc {server.grpc_url} (model {options.model} from {options.repository})", flush=True)
    urls = list(options.triton_urls) or [server.grpc_url if options.protocol == "grpc" else server.http_url]
    try:
        _start_ray(options.ray_address)
        startup = time.monotonic() - started  # Triton and Ray ready: what every run pays before its first slide
        progress, model_version = asyncio.run(process(options, urls))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if server is not None:
            server.stop()
    results = read_parts(options.output)
    slides, cells = write_tables(options.output, results)
    wall = time.monotonic() - started
    ok = sum(r.status == "ok" for r in results)
    report = {
        "inputs": options.inputs,
        "output": str(options.output),
        "model": options.model,
        "model_version": model_version,
        "triton_urls": urls,
        "protocol": options.protocol,
        "embedded_triton": server is not None,
        "stain_normalise": options.stain_normalise,
        "slides": slides,
        "slides_ok": ok,
        "slides_error": slides - ok,
        "slides_processed_this_run": progress.done - progress.lost,
        "slides_skipped_as_finished": progress.skipped,
        "slides_lost": progress.lost,
        "cells": cells,
        "cells_this_run": progress.cells,
        "wall_seconds": round(wall, 2),
        "startup_seconds": round(startup, 2),
        "cells_per_second": round(progress.cells / wall, 2),
        "steady_cells_per_second": round(progress.cells / max(wall - startup, 1e-9), 2),
        "slides_per_second": round((progress.done - progress.lost) / wall, 3),
    }
    (options.output / "run.json").write_text(json.dumps(report, indent=2))
    print(summary_table(results))
    print(f"{slides} slides ({ok} ok, {slides - ok} error, {progress.lost} lost), {cells} cells; "
          f"this run: {progress.done - progress.lost} slides in {wall:.1f}s, {report['cells_per_second']} cells/s. "
          f"Results in {options.output}", flush=True)
    if progress.lost or ok == 0:
        return 1
    return 0


if __name__ == "__main__":
    from batch.commands import configure_run
    from cells.cli import standalone

    raise SystemExit(standalone("batch/run.py", __doc__.splitlines()[0], configure_run))
