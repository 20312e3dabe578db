"""The one Triton client of the project (batch and bench use it): asyncio, gRPC or HTTP.

It keeps a bounded number of requests in flight, splits batches to the server's max_batch_size,
retries unavailable servers with exponential backoff and jitter, fails over between several URLs,
and never retries a request the server rejected as invalid.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from cells.contract import (
    CHANNELS, CLASSES, DETECTOR_INPUT, DETECTOR_OUTPUT, FIELD_INPUT, FIELD_OPTIONS, FIELD_OUTPUTS, INPUT_DTYPE, INPUT_NAME,
    INPUT_SHAPE, MAX_IN_FLIGHT, MODEL_NAME, NUMPY_TYPES, OUTPUT_DTYPE, OUTPUT_NAME, REQUEST_BATCH_SIZE,
)
from cells.errors import BadInput, UserError, describe, first_line

# Statuses that mean "this server cannot take it now", not "this request is wrong".
RETRYABLE_STATUSES = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.CANCELLED",
    "StatusCode.ABORTED",
    "429",
    "502",
    "503",
    "504",
}


class ContractError(UserError, ValueError):
    """The served model does not match the contract in cells.contract."""


class InferenceRejected(ValueError):
    """The server refused the request as invalid; retrying would not help."""


class ServersUnavailable(UserError, RuntimeError):
    """No server answered within the retries."""


POLICIES = ("round-robin", "first-up")


@dataclass(frozen=True)
class ClientOptions:
    urls: tuple[str, ...]
    protocol: str = "grpc"
    model: str = MODEL_NAME
    batch_size: int = REQUEST_BATCH_SIZE
    max_in_flight: int = MAX_IN_FLIGHT
    timeout_s: float = 60.0
    retries: int = 6
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0
    policy: str = "round-robin"  # or "first-up": the first URL that is up takes every request (a node-local server)

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "http"):
            raise BadInput(f"protocol must be grpc or http, not {self.protocol!r}")
        if self.policy not in POLICIES:
            raise BadInput(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if not self.urls:
            raise BadInput("at least one Triton URL is needed")


def is_retryable(error: BaseException) -> bool:
    from tritonclient.utils import InferenceServerException

    if isinstance(error, (asyncio.TimeoutError, OSError, ConnectionError)):
        return True
    if isinstance(error, InferenceServerException):
        status = str(error.status() or "")
        return status in RETRYABLE_STATUSES or (not status and "connect" in str(error).lower())
    return type(error).__module__.startswith("aiohttp")


def _message(error: BaseException) -> str:
    from tritonclient.utils import InferenceServerException

    if isinstance(error, InferenceServerException):
        return first_line(error.message() or error)
    return describe(error)


@dataclass(frozen=True)
class Contract:
    """What a served model takes and returns (batch dimension first), from cells.contract."""

    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]


CLASSIFIER = Contract(INPUT_NAME, (-1, *INPUT_SHAPE), OUTPUT_NAME, (-1, len(CLASSES)))
DETECTOR = Contract(DETECTOR_INPUT, (-1, -1, -1, CHANNELS), DETECTOR_OUTPUT, (-1, -1, -1, 2))
FIELD = Contract(FIELD_INPUT, (-1, 1), "boxes", (-1, -1, 4))  # and the other FIELD_OUTPUTS (cells.contract)


def check_field_contract(metadata: dict, model: str) -> None:
    """The field model's metadata has its BYTES input and every output of cells.contract.FIELD_OUTPUTS."""
    if metadata.get("name") != model:
        raise ContractError(f"server model is {metadata.get('name')!r}, expected {model!r}")
    inputs = {tensor.get("name"): tensor.get("datatype") for tensor in metadata.get("inputs", [])}
    outputs = {tensor.get("name"): tensor.get("datatype") for tensor in metadata.get("outputs", [])}
    if inputs.get(FIELD_INPUT) != "BYTES":
        raise ContractError(f"model {model} has no BYTES input {FIELD_INPUT!r}")
    missing = [name for name, (dtype, _) in FIELD_OUTPUTS.items() if outputs.get(name) != dtype]
    if missing:
        raise ContractError(f"model {model} lacks the outputs {', '.join(missing)} of the field contract")


def check_contract(metadata: dict, model: str, contract: Contract = CLASSIFIER) -> None:
    """Compare the server's model metadata with the contract; raise with a one-line reason."""
    if metadata.get("name") != model:
        raise ContractError(f"server model is {metadata.get('name')!r}, expected {model!r}")
    expected = {
        "inputs": (contract.input_name, INPUT_DTYPE, list(contract.input_shape)),
        "outputs": (contract.output_name, OUTPUT_DTYPE, list(contract.output_shape)),
    }
    for side, (name, dtype, shape) in expected.items():
        tensors = metadata.get(side, [])
        if len(tensors) != 1:
            raise ContractError(f"model {model} has {len(tensors)} {side}, expected 1 ({name})")
        tensor = tensors[0]
        found = (tensor.get("name"), tensor.get("datatype"), [int(d) for d in tensor.get("shape", [])])
        if found != (name, dtype, shape):
            raise ContractError(f"model {model} {side[:-1]} is {found}, expected {(name, dtype, shape)}")


@dataclass
class RequestTally:
    """Requests answered and failed (retryable failures: down, busy, timed out) per server URL."""

    answered: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    bytes_sent: int = 0  # the answered requests' input tensors, as the client sent them

    def add(self, other: "RequestTally") -> None:
        self.answered.update(other.answered)
        self.failed.update(other.failed)
        self.bytes_sent += other.bytes_sent

    def as_dict(self) -> dict[str, dict[str, int]]:
        urls = sorted(set(self.answered) | set(self.failed))
        return {url: {"answered": self.answered[url], "failed": self.failed[url]} for url in urls}


@dataclass
class _Server:
    url: str
    client: object
    down_until: float = 0.0
    failures: int = 0  # retryable failures in a row; the next back-off doubles with each


@dataclass
class TritonModel:
    """A served model behind one or more URLs: `async with TritonModel(options) as classifier:
    probs = await classifier.classify(crops)`; with `contract=DETECTOR`, `maps = await detector.detect(field)`."""

    options: ClientOptions
    max_batch_size: int = 0
    model_version: str = ""  # the newest version the server lists, the one it serves by default
    servers: list[_Server] = field(default_factory=list)
    requests_sent: int = 0
    retries_done: int = 0
    request_seconds: list[float] | None = None  # when a list is given, each answered request's latency is added
    contract: Contract = CLASSIFIER
    _turn: int = 0

    def _library(self):
        if self.options.protocol == "grpc":
            import tritonclient.grpc.aio as library
        else:
            import tritonclient.http.aio as library
        return library

    async def connect(self) -> "TritonModel":
        """Open every URL; check the contract and read max_batch_size from the first that answers."""
        library = self._library()
        self.servers = [_Server(url, library.InferenceServerClient(url)) for url in self.options.urls]
        errors = []
        for server in self.servers:
            try:
                metadata, config = await asyncio.wait_for(self._describe(server), self.options.timeout_s)
            except Exception as error:  # noqa: BLE001 - try the next URL; report all if none answers
                if not is_retryable(error):
                    await self.close()
                    raise ContractError(f"{server.url} has no usable model {self.options.model!r}: {_message(error)}") from error
                errors.append(f"{server.url}: {_message(error)}")
                server.down_until = time.monotonic() + self.options.backoff_max_s
                continue
            if self.contract is FIELD:
                check_field_contract(metadata, self.options.model)
            else:
                check_contract(metadata, self.options.model, self.contract)
            self.max_batch_size = int(config.get("max_batch_size", 0))
            self.model_version = max(metadata.get("versions", []), key=int, default="")
            return self
        await self.close()
        raise ServersUnavailable("no Triton server answered: " + "; ".join(errors))

    async def _describe(self, server: _Server) -> tuple[dict, dict]:
        if self.options.protocol == "grpc":
            metadata = await server.client.get_model_metadata(self.options.model, as_json=True)
            config = (await server.client.get_model_config(self.options.model, as_json=True))["config"]
        else:
            metadata = await server.client.get_model_metadata(self.options.model)
            config = await server.client.get_model_config(self.options.model)
        return metadata, config

    async def close(self) -> None:
        for server in self.servers:
            await server.client.close()

    async def __aenter__(self) -> "TritonModel":
        return await self.connect()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def chunk_size(self) -> int:
        return min(self.options.batch_size, self.max_batch_size) if self.max_batch_size > 0 else self.options.batch_size

    async def classify(self, images: np.ndarray, tally: RequestTally | None = None) -> np.ndarray:
        """Probabilities [N,2] for uint8 crops [N,128,128,3], in input order, each crop exactly once.

        `tally`, when given, counts this call's requests per server."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != INPUT_SHAPE:
            raise InferenceRejected(f"crops must be uint8 [N,{','.join(map(str, INPUT_SHAPE))}], got {images.dtype} {list(images.shape)}")
        if len(images) == 0:
            return np.zeros((0, len(CLASSES)), np.float32)
        size = self.chunk_size()
        gate = asyncio.Semaphore(self.options.max_in_flight)

        async def bounded(chunk: np.ndarray) -> np.ndarray:
            async with gate:
                return await self._infer_with_retries(chunk, tally)

        parts = await asyncio.gather(*(bounded(images[i : i + size]) for i in range(0, len(images), size)))
        return np.concatenate(parts)

    async def detect(self, field: np.ndarray, tally: RequestTally | None = None) -> np.ndarray:
        """The detector's maps [H, W, 2] for one uint8 field [H, W, 3] (contract DETECTOR)."""
        if field.dtype != np.uint8 or field.ndim != 3 or field.shape[2] != CHANNELS:
            raise InferenceRejected(f"a field must be uint8 [H,W,3], got {field.dtype} {list(field.shape)}")
        return (await self._infer_with_retries(field[None], tally))[0]

    async def analyse(self, data: bytes, options: dict[str, float | bool | int] | None = None,
                      tally: RequestTally | None = None) -> dict[str, np.ndarray]:
        """The field model's outputs (cells.contract.FIELD_OUTPUTS, batch dimension removed) for one
        encoded field, with the optional inputs in `options` (FIELD_OPTIONS) (contract FIELD)."""
        return await self._infer_with_retries((data, options or {}), tally)

    def _next_server(self) -> _Server:
        """Round robin (or, for "first-up", the first in order) over servers that are not marked down;
        the soonest back if all are."""
        now = time.monotonic()
        if self.options.policy == "first-up":
            return next((s for s in self.servers if s.down_until <= now), min(self.servers, key=lambda s: s.down_until))
        for _ in range(len(self.servers)):
            server = self.servers[self._turn % len(self.servers)]
            self._turn += 1
            if server.down_until <= now:
                return server
        return min(self.servers, key=lambda s: s.down_until)

    async def _infer_with_retries(self, chunk: np.ndarray, tally: RequestTally | None = None) -> np.ndarray:
        """Send one chunk; on a retryable failure mark that server down (longer each time it fails in
        a row) and retry at once on another that is up, or, when none is, after the soonest is back."""
        last_error: BaseException | None = None
        for _ in range(self.options.retries + 1):
            server = self._next_server()
            wait = server.down_until - time.monotonic()
            if wait > 0:  # every server is marked down
                await asyncio.sleep(wait * random.uniform(1.0, 1.5))
            try:
                self.requests_sent += 1
                started = time.perf_counter()
                result = await asyncio.wait_for(self._infer(server, chunk), self.options.timeout_s)
                if self.request_seconds is not None:
                    self.request_seconds.append(time.perf_counter() - started)
                if tally is not None:
                    tally.answered[server.url] += 1
                    tally.bytes_sent += len(chunk[0]) if self.contract is FIELD else chunk.nbytes
                server.failures = 0
                return result
            except Exception as error:  # noqa: BLE001 - sorted into retryable or rejected below
                if not is_retryable(error):
                    raise InferenceRejected(f"{server.url} rejected the request: {_message(error)}") from error
                last_error = error
                if tally is not None:
                    tally.failed[server.url] += 1
                server.failures += 1
                delay = min(self.options.backoff_max_s, self.options.backoff_s * 2 ** (server.failures - 1))
                server.down_until = time.monotonic() + delay
                self.retries_done += 1
        raise ServersUnavailable(
            f"no server took a {'field' if self.contract is FIELD else f'batch of {len(chunk)}'} after {self.options.retries + 1} attempts: {_message(last_error)}"
        )

    async def _infer(self, server: _Server, chunk):
        library = self._library()
        if self.contract is FIELD:
            return await self._infer_field(library, server, *chunk)
        request = library.InferInput(self.contract.input_name, list(chunk.shape), INPUT_DTYPE)
        request.set_data_from_numpy(np.ascontiguousarray(chunk))
        output = library.InferRequestedOutput(self.contract.output_name)
        result = await server.client.infer(self.options.model, [request], outputs=[output])
        return result.as_numpy(self.contract.output_name)

    async def _infer_field(self, library, server: _Server, data: bytes, options: dict) -> dict[str, np.ndarray]:
        encoded = library.InferInput(FIELD_INPUT, [1, 1], "BYTES")
        encoded.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        inputs = [encoded]
        for key, value in options.items():
            kind = FIELD_OPTIONS[key]
            tensor = library.InferInput(key, [1, 1], kind)
            tensor.set_data_from_numpy(np.array([[value]], NUMPY_TYPES[kind]))
            inputs.append(tensor)
        outputs = [library.InferRequestedOutput(name) for name in FIELD_OUTPUTS]
        result = await server.client.infer(self.options.model, inputs, outputs=outputs)
        return {name: result.as_numpy(name)[0] for name in FIELD_OUTPUTS}


async def unavailable(options: ClientOptions, contract: Contract) -> str:
    """Why no server serves `options.model` under `contract` ('' if one does)."""
    try:
        model = await TritonModel(options, contract=contract).connect()
    except (ContractError, ServersUnavailable) as error:
        return str(error)
    await model.close()
    return ""


def classify(options: ClientOptions, images: np.ndarray) -> np.ndarray:
    """Synchronous convenience: connect, classify, close."""

    async def run() -> np.ndarray:
        async with TritonModel(options) as classifier:
            return await classifier.classify(images)

    return asyncio.run(run())
