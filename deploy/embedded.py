"""`smearscope serve`: a real Triton server (PyTriton's tritonserver) serving the repository's models.

PyTriton 0.7 ships tritonserver with the Python backend only, so each model runs in ONNX Runtime or
OpenVINO (cells.runtime) behind that backend, under the repository's model name and with its config's inputs, outputs,
max_batch_size and dynamic batching: clients cannot tell it from Triton's onnxruntime backend.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np


from cells.errors import UserError
from cells.repository import CONFIG_FILE, model_dir, read_model_config, runtime_model, served_onnx
from deploy.leftovers import Leftovers, orphans

ACCESS_TOKEN_ENV = "SMEARSCOPE_TRITON_ACCESS_TOKEN"


class ServeError(UserError, RuntimeError):
    """The server cannot start: a busy port, or no servable model in the repository."""


@dataclass(frozen=True)
class ServeOptions:
    repository: Path
    names: tuple[str, ...] = ()  # models to serve; empty: every model of the repository
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    threads: int = 0
    runtime: str = "auto"  # cells.runtime: onnxruntime, openvino, or auto (measured faster on this CPU)
    parent_pid: int | None = None  # shut down once this process (the launcher) is gone
    crops: str = "numpy"  # the field model's crops: fields.pipeline.CROP_ENGINES (numpy: faster on a CPU)


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ServeError(f"port {host}:{port} is not available ({error.strerror})") from error


def model_names(options: ServeOptions) -> tuple[str, ...]:
    """The models to serve: those named, or every folder of the repository with a config."""
    from cells.contract import CROPS_NAME

    if options.names:
        return options.names
    # The crop graph is a step of the field model, run inside it here (the official container serves it on its own).
    names = tuple(sorted(p.parent.name for p in Path(options.repository).glob(f"*/{CONFIG_FILE}") if p.parent.name != CROPS_NAME))
    if not names:
        raise ServeError(f"no model in repository {options.repository} (no */{CONFIG_FILE})")
    return names


def servable_config(repository: Path, name: str):
    """The parsed config of the named model, which has an ONNX model, or a one-line reason why not."""
    model = model_dir(repository, name)
    if not (model / CONFIG_FILE).is_file():
        raise ServeError(f"no model {name!r} in repository {repository} (missing {CONFIG_FILE})")
    config = read_model_config(model)
    onnx = served_onnx(repository, name)
    if not onnx.is_file():
        raise ServeError(
            f"{model} has no {onnx.parent.name}/model.onnx; this CPU server runs ONNX models "
            "(a model.plan needs the GPU container: deploy/gpu/docker-compose.yml)"
        )
    return config


def _fix_python_backend_environment() -> None:
    """The backend stub links libpython: pyenv interpreters need their LIBDIR first (platform notes)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and not current.startswith(libdir):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def _runtime_model(path: Path, config, threads: int, runtime: str):
    """The model at `path` run by `runtime` (cells.runtime) with its config's tensor names and batch size."""
    from cells.runtime import RUNTIMES

    input_config, output_config = config.input[0], config.output[0]
    # Fixed-size inputs (crops) come many to a request: OpenVINO splits each over its CPU streams.
    throughput = {"throughput": all(dim > 0 for dim in input_config.dims)} if runtime == "openvino" else {}
    return RUNTIMES[runtime](path, batch_size=max(1, config.max_batch_size), threads=threads,
                             input_name=input_config.name, output_name=output_config.name, **throughput)


def _allow_empty_outputs() -> None:
    """Let PyTriton 0.7 answer zero-size tensors (a field without cells): its shared-memory copy casts
    each frame's memoryview to bytes, which Python refuses for an empty array. Same copy, the empty
    frame's (nothing) skipped; its size is still written, so the reader sees an empty tensor."""
    import struct

    from pytriton.proxy.data import TensorStore

    def copy_frames(self, frames, shm, offset: int) -> int:
        total_size = struct.calcsize("<I")
        for frame in frames:
            frame = memoryview(frame) if isinstance(frame, bytes) else frame
            struct.pack_into("<I", shm.buf, offset + total_size, frame.nbytes)
            total_size += struct.calcsize("<I")
            if frame.nbytes:
                shm.buf[offset + total_size : offset + total_size + frame.nbytes] = frame.cast("B")
            total_size += frame.nbytes
        struct.pack_into("<I", shm.buf, offset, total_size)
        return total_size

    TensorStore._copy_frames = copy_frames


def _bind_field(triton, repository: Path, loaded: dict, threads: int, runtime: str, crops: str) -> None:
    """The field model (cells.contract.FIELD_NAME): PyTriton has no ensembles and no calls between
    bound models, so its callable runs the steps itself (fields.pipeline) with the repository's
    detector, crop graph and classifier, each by the runtime chosen for it. Triton's dynamic batcher
    gives a call up to FIELD_MAX_BATCH fields that arrived together; their crops are classified at once.
    Models also served on their own (`loaded`, by name) are shared, not loaded twice."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    from cells.contract import (
        CROPS_NAME, DETECTOR_NAME, FIELD_INPUT, FIELD_MAX_BATCH, FIELD_NAME, FIELD_OPTIONS, FIELD_OUTPUTS, MODEL_NAME,
        NUMPY_TYPES,
    )
    from cells.decision import read_decision
    from cells.runtime import OnnxGraph, choose_runtime
    from fields.pipeline import FieldPipeline, FieldRequest

    def model(name: str):
        if name in loaded:
            return loaded[name]
        chosen = choose_runtime(repository, name, runtime)
        return _runtime_model(runtime_model(repository, name, chosen), servable_config(repository, name), threads, chosen)

    graph = served_onnx(repository, CROPS_NAME)
    _allow_empty_outputs()
    pipeline = FieldPipeline(model(DETECTOR_NAME), model(MODEL_NAME), OnnxGraph(graph, threads) if graph.is_file() else None,
                             read_decision(model_dir(repository, MODEL_NAME)).threshold, crops)

    def infer(requests) -> list[dict[str, np.ndarray]]:
        fields = [FieldRequest(bytes(request[FIELD_INPUT].reshape(-1)[0]),
                               **{key: request[key].reshape(-1)[0].item() for key in FIELD_OPTIONS if key in request})
                  for request in requests]
        return [{"boxes": cells.boxes[None], "areas": cells.areas[None], "probabilities": cells.probabilities[None],
                 "calls": cells.calls[None], "counts": cells.counts[None],
                 "size": np.array([[cells.width, cells.height]], np.int32),
                 "error": np.array([[cells.error.encode()]], dtype=np.object_)} for cells in pipeline(fields)]

    triton.bind(
        model_name=FIELD_NAME,
        infer_func=infer,
        inputs=[Tensor(name=FIELD_INPUT, dtype=np.bytes_, shape=(1,))]
        + [Tensor(name=key, dtype=np.dtype(NUMPY_TYPES[kind]).type, shape=(1,), optional=True)
           for key, kind in FIELD_OPTIONS.items()],
        outputs=[Tensor(name=key, dtype=np.dtype(NUMPY_TYPES[kind]).type, shape=shape)
                 for key, (kind, shape) in FIELD_OUTPUTS.items()],
        config=ModelConfig(max_batch_size=FIELD_MAX_BATCH, batcher=DynamicBatcher(max_queue_delay_microseconds=2000)),
        strict=True,
    )


def _bind(triton, name: str, model, config) -> None:
    """One repository model in PyTriton, run by `model` (a cells.runtime model), with its config's
    tensors, batching and queue policy."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction
    from tritonclient.grpc import model_config_pb2 as pb

    input_config, output_config = config.input[0], config.output[0]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {output_config.name: model(inputs[input_config.name])}

    queue = config.dynamic_batching.default_queue_policy
    triton.bind(
        model_name=name,
        infer_func=infer,
        inputs=[Tensor(name=input_config.name, dtype=np.uint8, shape=tuple(input_config.dims))],
        outputs=[Tensor(name=output_config.name, dtype=np.float32, shape=tuple(output_config.dims))],
        config=ModelConfig(
            max_batch_size=config.max_batch_size,
            batcher=DynamicBatcher(
                max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds,
                preferred_batch_size=list(config.dynamic_batching.preferred_batch_size) or None,
                default_queue_policy=QueuePolicy(
                    timeout_action=TimeoutAction(pb.ModelQueuePolicy.TimeoutAction.Name(queue.timeout_action)),
                    default_timeout_microseconds=queue.default_timeout_microseconds,
                    max_queue_size=queue.max_queue_size,
                ),
            ),
        ),
        strict=True,
    )
    # The config's parameters (the classifier's decision rule) for clients to read. PyTriton 0.7 has no
    # public way to set them; its model keeps the Triton config it sends when Triton starts (`run()`,
    # serve's lifecycle policy), so add them to that (tests/test_serve.py reads them back).
    served = next(model for model in triton._model_manager.models if model.model_name == name)
    served._get_triton_model_config().backend_parameters.update(
        {key: value.string_value for key, value in config.parameters.items()})


def serve(options: ServeOptions, stop: threading.Event | None = None) -> None:
    """Start Triton with every model asked for, print the URLs when ready, and block until
    SIGINT/SIGTERM or `stop` is set."""
    from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy, TritonSecurityConfig

    from cells.runtime import choose_runtime

    from cells.contract import FIELD_NAME

    names = model_names(options)
    configs = {name: servable_config(options.repository, name) for name in names if name != FIELD_NAME}
    runtimes = {name: choose_runtime(options.repository, name, options.runtime) for name in configs}
    models = {name: (runtime_model(options.repository, name, runtimes[name]), configs[name]) for name in configs}
    for port in (options.http_port, options.grpc_port, options.metrics_port):
        check_port_free(options.host, port)
    stop = stop or threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # A background process from a non-interactive shell inherits SIGINT ignored: handle it explicitly.
        signal.signal(signum, lambda *_: stop.set())
    _fix_python_backend_environment()
    logging.getLogger("pytriton").setLevel(logging.WARNING)
    triton_config = TritonConfig(
        http_address=options.host,
        http_port=options.http_port,
        grpc_address=options.host,
        grpc_port=options.grpc_port,
        metrics_address=options.host,
        metrics_port=options.metrics_port,
        log_verbose=0,
        exit_timeout_secs=2,
    )
    security = TritonSecurityConfig(access_token=os.environ.get(ACCESS_TOKEN_ENV) or None)
    # Models are bound first and Triton started with them all by run(): each loads once, with its full config.
    lifecycle = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=False)
    if removed := orphans().remove():
        print(f"removed what killed servers left: {removed}", flush=True)
    leftovers = Leftovers()
    try:
        with Triton(config=triton_config, security_config=security, triton_lifecycle_policy=lifecycle) as triton:
            try:
                loaded = {name: _runtime_model(path, config, options.threads, runtimes[name])
                          for name, (path, config) in models.items()}
                for name, (_, config) in models.items():
                    _bind(triton, name, loaded[name], config)
                if FIELD_NAME in names:
                    _bind_field(triton, options.repository, loaded, options.threads, options.runtime, options.crops)
                triton.run()
                served = ", ".join([f"{name} ({path}, {runtimes[name]})" for name, (path, _) in models.items()]
                                   + ([f"{FIELD_NAME} (crops: {options.crops})"] if FIELD_NAME in names else []))
                print(
                    f"serving {served} on http://{options.host}:{options.http_port} "
                    f"grpc://{options.host}:{options.grpc_port} metrics http://{options.host}:{options.metrics_port}/metrics",
                    flush=True,
                )
                while not stop.wait(0.2):
                    if not triton.is_alive():
                        raise ServeError("Triton stopped unexpectedly")
                    if options.parent_pid is not None and os.getppid() != options.parent_pid:
                        # Orphaned: the launcher was killed (SIGKILL, OOM) before it could stop us.
                        print("launcher process gone", flush=True)
                        break
                print("shutting down", flush=True)
            finally:
                leftovers = Leftovers.of_tree(os.getpid())  # while the stubs are still our descendants
    finally:
        if removed := leftovers.remove():  # stubs past Triton's exit timeout, regions it did not unlink
            print(f"removed after Triton's exit: {removed}", flush=True)
