"""Triton's config.pbtxt, generated from one set of parameters with Triton's own protobuf schema."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from cells.contract import (
    CHANNELS, CLASSES, DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT, IMAGE_SIZE, INPUT_NAME, LABELS_FILE,
    MAX_BATCH_SIZE, MODEL_NAME, OUTPUT_NAME, write_labels,
)
from cells.decision import read_decision
from cells.repository import CONFIG_FILE, OPENVINO_CONFIG, custom_config, model_dir, platform_of, runtime_model, version_dir

KINDS = ("classifier", "detector")


@dataclass(frozen=True)
class ServingParameters:
    name: str = MODEL_NAME
    max_batch_size: int = MAX_BATCH_SIZE
    preferred_batch_sizes: tuple[int, ...] = (16, 32, 64)
    max_queue_delay_microseconds: int = 2000
    # Overload: beyond this many queued requests (at 64 crops, ~3 MB each) Triton rejects new ones
    # (UNAVAILABLE: the client backs off and retries); a request queued longer than the timeout is
    # rejected too, before the client's own 60 s timeout gives up on it.
    max_queue_size: int = 64
    queue_timeout_microseconds: int = 30_000_000
    instance_count: int = 1
    onnx_on_gpu: bool = False
    kind: str = "classifier"  # which contract of cells/contract.py the model serves
    # Triton's OpenVINO backend (configs/openvino.pbtxt): CPU streams, one model instance (one infer
    # request) each. The classifier's crops batch well over 2 streams of 1 thread on 2 cores (cells.runtime,
    # OpenVinoModel); raise both together on larger hosts. 1: one request on every thread (the detector).
    openvino_streams: int = 2


# The detector takes one field per request (fields of one size can still be batched together).
DETECTOR_SERVING = ServingParameters(name=DETECTOR_NAME, max_batch_size=8, preferred_batch_sizes=(),
                                     max_queue_delay_microseconds=0, kind="detector", openvino_streams=1)


def _tensors(kind: str) -> tuple[list, list]:
    if kind == "detector":
        return ([pb.ModelInput(name=DETECTOR_INPUT, data_type=pb.TYPE_UINT8, dims=[-1, -1, CHANNELS])],
                [pb.ModelOutput(name=DETECTOR_OUTPUT, data_type=pb.TYPE_FP32, dims=[-1, -1, 2])])
    return ([pb.ModelInput(name=INPUT_NAME, data_type=pb.TYPE_UINT8, dims=[IMAGE_SIZE, IMAGE_SIZE, CHANNELS])],
            [pb.ModelOutput(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[len(CLASSES)], label_filename=LABELS_FILE)])


def build_config(params: ServingParameters, platform: str, parameters: dict[str, str] | None = None) -> pb.ModelConfig:
    """The model's Triton configuration: the serving contract plus batching and placement, and
    `parameters` (the classifier's decision rule) for clients to read."""
    gpu = platform == "tensorrt_plan" or params.onnx_on_gpu
    inputs, outputs = _tensors(params.kind)
    preferred = [size for size in params.preferred_batch_sizes if size <= params.max_batch_size]
    return pb.ModelConfig(
        name=params.name,
        platform=platform,
        max_batch_size=params.max_batch_size,
        version_policy=pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=1)),
        input=inputs,
        output=outputs,
        dynamic_batching=pb.ModelDynamicBatching(
            preferred_batch_size=preferred,
            max_queue_delay_microseconds=params.max_queue_delay_microseconds,
            default_queue_policy=pb.ModelQueuePolicy(
                timeout_action=pb.ModelQueuePolicy.REJECT,
                default_timeout_microseconds=params.queue_timeout_microseconds,
                max_queue_size=params.max_queue_size,
            ),
        ),
        instance_group=[
            pb.ModelInstanceGroup(
                kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU,
                count=params.instance_count,
            )
        ],
        parameters={key: pb.ModelParameter(string_value=value) for key, value in (parameters or {}).items()},
    )


def openvino_config(config: pb.ModelConfig, params: ServingParameters, model_file: str) -> pb.ModelConfig:
    """`config` for Triton's OpenVINO backend: the same tensors, batching and parameters, run from
    `model_file` (OpenVINO's own model.xml, or the ONNX) in as many streams as instances."""
    openvino = pb.ModelConfig()
    openvino.CopyFrom(config)
    openvino.ClearField("platform")
    openvino.backend, openvino.default_model_filename = "openvino", model_file
    del openvino.instance_group[:]
    openvino.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=params.openvino_streams)
    hint = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(params.openvino_streams)} \
        if params.openvino_streams > 1 else {"PERFORMANCE_HINT": "LATENCY"}
    for key, value in hint.items():
        openvino.parameters[key].string_value = value
    return openvino


def write_model_config(repository: Path, params: ServingParameters) -> Path:
    """Write config.pbtxt and labels for what the model's version directory holds now; a classifier's
    config carries the decision rule of its decision.json (or the 0.5 default). A CPU version (ONNX)
    also gets configs/openvino.pbtxt, for Triton's OpenVINO backend (deploy/cpu)."""
    folder = model_dir(repository, params.name)
    parameters = read_decision(folder).triton_parameters() if params.kind == "classifier" else None
    platform = platform_of(version_dir(repository, params.name))
    config = build_config(params, platform, parameters)
    path = folder / CONFIG_FILE
    path.write_text(text_format.MessageToString(config))
    openvino = custom_config(repository, params.name, OPENVINO_CONFIG)
    openvino.unlink(missing_ok=True)
    if platform == "onnxruntime_onnx":
        model_file = runtime_model(repository, params.name, "openvino").name
        openvino.parent.mkdir(exist_ok=True)
        openvino.write_text(text_format.MessageToString(openvino_config(config, params, model_file)))
    if params.kind == "classifier":
        write_labels(path.parent)
    return path
