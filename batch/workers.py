"""The batch job's Ray task: one slide end to end on a worker, classified through the worker's own Triton client.

The driver sends a slide (a location: a file, an object, a zip's member, a whole-slide tile; or a
tar member's bytes); the worker reads and analyses it, writes its part (and overlay) to the output
itself, whole or not at all, and returns only a few numbers: neither the image, nor the crops, nor
Triton's traffic, nor the cells pass through the driver. An object store that does not answer
(after the SDK's retries) loses the slide (no part) and stops the run: a rerun resumes it. A task whose worker process or
node dies is rerun by Ray on whichever node has a free CPU; a part written by a task that is then
rerun is written again whole, with the same content.

Each worker process keeps one asyncio loop in a background thread and one connected client per
set of options on it, so a slide pays no connection set-up after the process's first.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field, replace

import numpy as np

from batch import storage
from batch.field import FieldSettings, detector_options, field_options
from batch.inputs import Slide, Unreadable, read_slide
from batch.overlay import overlay_path
from batch.results import FieldResult, failed, write_part
from batch.wsi import Tile, read_region
from deploy.client import CLASSIFIER, DETECTOR, FIELD, ClientOptions, RequestTally

WORKER_RETRIES = 2  # a slide whose worker dies this many times more becomes an error row
NODE_PLACEHOLDER = "{node}"  # in a Triton URL: the address of the node the worker runs on


@dataclass
class Outcome:
    """One slide as a worker finished it, its part written: its counts, where it ran, the requests per
    server. `lost` is set (and no part written) when no server took its cells (not the slide's fault)."""

    node_id: str
    node_address: str
    cells: int = 0
    error: bool = False
    model_version: str = ""
    lost: str = ""
    storage_down: bool = False  # lost because the object store did not answer: the run stops (resumably)
    tally: RequestTally = field(default_factory=RequestTally)
    bytes_read: int = 0  # from the input's file or object


@dataclass(frozen=True)
class Shared:
    """What every slide's task of a run shares: put in Ray's object store once, not sent with each task."""

    options: ClientOptions
    overlays: bool
    max_bytes: int
    output: str  # an absolute path (the same on every node) or an s3:// prefix


_loop: asyncio.AbstractEventLoop | None = None
_models: dict = {}
_lock = threading.Lock()


def _client_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="triton-client", daemon=True).start()
    return _loop


def node_urls(urls: tuple[str, ...], node_address: str) -> tuple[str, ...]:
    """The URLs with `{node}` replaced by this node's address (a Triton on every node)."""
    return tuple(url.replace(NODE_PLACEHOLDER, node_address) for url in urls)


async def _connected(options: ClientOptions, contract):
    """This process's client for these options and contract, connected on first use."""
    from deploy.client import TritonModel

    if (options, contract) not in _models:
        _models[options, contract] = await TritonModel(options, contract=contract).connect()
    return _models[options, contract]


def _read(work: Slide | Tile, max_bytes: int) -> bytes | np.ndarray:
    """The encoded bytes of a field, or the decoded region of a whole-slide tile."""
    if isinstance(work, Tile):
        return read_region(work.path, work.read)
    return read_slide(work, max_bytes)


async def _analyse(work: Slide | Tile, options: ClientOptions, settings: FieldSettings, overlays: bool, max_bytes: int,
                   outcome: Outcome) -> tuple[FieldResult | None, bytes | None]:
    """The field's result (None when lost) and its overlay PNG when asked for."""
    from batch.field import analyse_field, analyse_image
    from deploy.client import InferenceRejected, ServersUnavailable

    field_id, source = (work.field_id, work.path) if isinstance(work, Tile) else (work.slide_id, work.source)
    try:
        data = await asyncio.to_thread(_read, work, max_bytes)
    except storage.StorageUnavailable as error:
        outcome.lost, outcome.storage_down = str(error), True
        return None, None
    except Unreadable as error:
        return failed(field_id, source, str(error)), None
    except (OSError, ValueError) as error:  # tifffile reports a damaged tile as a ValueError
        return failed(field_id, source, f"unreadable file: {getattr(error, 'strerror', None) or error}"), None
    try:
        classifier = await _connected(options, CLASSIFIER)
        detector = field_model = None
        if settings.finder == "learned" and isinstance(work, Tile):
            detector = await _connected(detector_options(options), DETECTOR)
        elif settings.finder == "learned":
            field_model = await _connected(field_options(options), FIELD)
        if isinstance(work, Tile):
            left, top = work.read[:2]
            analysed = await analyse_image(data, classifier, settings, field_id, source, tally=outcome.tally,
                                           detector=detector, owns=lambda x, y: work.owns(x + left, y + top),
                                           offset=(left, top))
        else:
            analysed = await analyse_field(data, classifier, settings, field_id, source,
                                           keep_image=overlays, tally=outcome.tally, field_model=field_model)
    except (InferenceRejected, ServersUnavailable) as error:
        outcome.lost = str(error)
        return None, None
    outcome.model_version = classifier.model_version
    if overlays and analysed.result.status == "ok" and analysed.image is not None:
        return analysed.result, analysed.overlay_png()
    return analysed.result, None


def analyse_slide(work: Slide | Tile, shared: Shared, settings: FieldSettings) -> Outcome:
    """The Ray task's body: one field (an image) or one tile of a whole-slide image analysed on the
    worker's client loop, its overlay and part written to `shared.output`."""
    import ray

    address = ray.util.get_node_ip_address()
    outcome = Outcome(ray.get_runtime_context().get_node_id(), address)
    options = replace(shared.options, urls=node_urls(shared.options.urls, address))
    read_before = storage.bytes_read()
    result, overlay_png = asyncio.run_coroutine_threadsafe(
        _analyse(work, options, settings, shared.overlays, shared.max_bytes, outcome), _client_loop()).result()
    outcome.bytes_read = storage.bytes_read() - read_before
    if result is None:
        return outcome
    try:
        if overlay_png is not None:
            path = overlay_path(shared.output, work)
            storage.atomic_write(path, overlay_png)
            result.overlay = storage.relative(path, shared.output)
        write_part(shared.output, work.key, result)
    except storage.StorageUnavailable as error:
        outcome.lost, outcome.storage_down = str(error), True
        return outcome
    outcome.cells, outcome.error = result.cells, result.status == "error"
    return outcome


def remote_analyse_slide(cpus: float = 1.0):
    """`analyse_slide` as a Ray task of `cpus` CPUs, spread over the nodes, rerun up to WORKER_RETRIES times if its worker dies."""
    import ray

    return ray.remote(num_cpus=cpus, max_retries=WORKER_RETRIES, scheduling_strategy="SPREAD")(analyse_slide)
