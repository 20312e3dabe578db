"""Triton's config.pbtxt, generated from one set of parameters with Triton's own protobuf schema."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from cells.contract import CLASSES, IMAGE_SIZE, CHANNELS, INPUT_NAME, LABELS_FILE, MODEL_NAME, OUTPUT_NAME, write_labels

CONFIG_FILE = "config.pbtxt"
VERSION = 1
PLATFORM_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}


@dataclass(frozen=True)
class ServingParameters:
    name: str = MODEL_NAME
    max_batch_size: int = 256
    preferred_batch_sizes: tuple[int, ...] = (16, 32, 64)
    max_queue_delay_microseconds: int = 2000
    instance_count: int = 1
    onnx_on_gpu: bool = False


def platform_of(version_dir: Path) -> str:
    """tensorrt_plan when the version holds an engine, else onnxruntime_onnx; an empty version is an error."""
    for platform, filename in PLATFORM_FILES.items():
        if (version_dir / filename).is_file():
            return platform
    raise FileNotFoundError(f"no model.plan or model.onnx in {version_dir}")


def build_config(params: ServingParameters, platform: str) -> pb.ModelConfig:
    """The model's Triton configuration: the serving contract plus batching and placement."""
    gpu = platform == "tensorrt_plan" or params.onnx_on_gpu
    preferred = [size for size in params.preferred_batch_sizes if size <= params.max_batch_size]
    return pb.ModelConfig(
        name=params.name,
        platform=platform,
        max_batch_size=params.max_batch_size,
        version_policy=pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=1)),
        input=[pb.ModelInput(name=INPUT_NAME, data_type=pb.TYPE_UINT8, dims=[IMAGE_SIZE, IMAGE_SIZE, CHANNELS])],
        output=[
            pb.ModelOutput(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[len(CLASSES)], label_filename=LABELS_FILE)
        ],
        dynamic_batching=pb.ModelDynamicBatching(
            preferred_batch_size=preferred, max_queue_delay_microseconds=params.max_queue_delay_microseconds
        ),
        instance_group=[
            pb.ModelInstanceGroup(
                kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU,
                count=params.instance_count,
            )
        ],
    )


def write_model_config(repository: Path, params: ServingParameters) -> Path:
    """Write config.pbtxt and labels for what the model's version directory holds now."""
    model_dir = Path(repository) / params.name
    config = build_config(params, platform_of(model_dir / str(VERSION)))
    path = model_dir / CONFIG_FILE
    path.write_text(text_format.MessageToString(config))
    write_labels(model_dir)
    return path


def read_model_config(model_dir: Path) -> pb.ModelConfig:
    """Parse a config.pbtxt with Triton's schema; unknown fields are an error, as in Triton."""
    return text_format.Parse(Path(model_dir, CONFIG_FILE).read_text(), pb.ModelConfig())
