"""The field model's folders in a repository: the crop graph (`cell_crops`) and `smear_field`.

`smear_field` is a Python-backend model for the official container: its `model.py` (BLS) runs the
same steps as the embedded server (fields.pipeline), calling the detector, the crop graph and the
classifier as the repository's other models, so on a GPU host each runs in its own engine.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from cells.contract import (
    CROPS_INPUTS, CROPS_NAME, CROPS_OUTPUT, FIELD_INPUT, FIELD_MAX_BATCH, FIELD_NAME, FIELD_OPTIONS, FIELD_OUTPUTS,
    IMAGE_SIZE, MODEL_NAME, write_labels,
)
from cells.decision import read_decision
from cells.repository import CONFIG_FILE, DEFAULT_REPOSITORY, model_dir, served_onnx, version_dir
from export.crop_graph import build_crop_graph

BLS_FILE = "model.py"
TYPES = {"FP32": pb.TYPE_FP32, "INT32": pb.TYPE_INT32, "INT64": pb.TYPE_INT64, "BOOL": pb.TYPE_BOOL,
         "BYTES": pb.TYPE_STRING, "UINT8": pb.TYPE_UINT8}


def _tensor(kind, name: str, datatype: str, dims: tuple[int, ...], optional: bool = False):
    tensor = kind(name=name, data_type=TYPES[datatype], dims=list(dims))
    if optional:
        tensor.optional = True
    return tensor


def crops_config(platform: str = "onnxruntime_onnx") -> pb.ModelConfig:
    """The crop graph: one field a request (no batch dimension), ONNX Runtime (tensorrt_plan on a GPU host)."""
    field, labels, windows, factor, normalise = CROPS_INPUTS
    return pb.ModelConfig(
        name=CROPS_NAME, platform=platform, max_batch_size=0,
        input=[_tensor(pb.ModelInput, field, "UINT8", (-1, -1, 3)), _tensor(pb.ModelInput, labels, "INT32", (-1, -1)),
               _tensor(pb.ModelInput, windows, "INT32", (-1, 4)), _tensor(pb.ModelInput, factor, "FP32", (1,)),
               _tensor(pb.ModelInput, normalise, "BOOL", (1,))],
        output=[_tensor(pb.ModelOutput, CROPS_OUTPUT, "UINT8", (-1, IMAGE_SIZE, IMAGE_SIZE, 3))],
    )


def field_config(threshold: float) -> pb.ModelConfig:
    """The field model: encoded fields in, batched FIELD_MAX_BATCH at a time, cells out; `threshold`:
    the classifier's published one, which the field model's calls use unless a request sets its own."""
    config = pb.ModelConfig(
        name=FIELD_NAME, backend="python", max_batch_size=FIELD_MAX_BATCH,
        input=[_tensor(pb.ModelInput, FIELD_INPUT, "BYTES", (1,))]
        + [_tensor(pb.ModelInput, key, kind, (1,), optional=True) for key, kind in FIELD_OPTIONS.items()],
        output=[_tensor(pb.ModelOutput, key, kind, shape) for key, (kind, shape) in FIELD_OUTPUTS.items()],
        dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=2000),
    )
    config.output[list(FIELD_OUTPUTS).index("calls")].label_filename = "labels.txt"
    config.parameters["decision_threshold"].string_value = repr(threshold)
    return config


def _write_config(repository: Path, config: pb.ModelConfig) -> Path:
    path = model_dir(repository, config.name) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(config))
    return path


def write_crops_config(repository: Path, platform: str = "onnxruntime_onnx") -> Path:
    """The crop graph's config.pbtxt, for its ONNX model or (on a GPU host) its TensorRT engine."""
    return _write_config(repository, crops_config(platform))


def write_field_model(repository: Path) -> list[Path]:
    """The crop graph and the field model's config and BLS code in `repository`; the paths written."""
    written = [build_crop_graph(served_onnx(repository, CROPS_NAME)), write_crops_config(repository)]
    written.append(_write_config(repository, field_config(read_decision(model_dir(repository, MODEL_NAME)).threshold)))
    bls = version_dir(repository, FIELD_NAME) / BLS_FILE
    source = version_dir(DEFAULT_REPOSITORY, FIELD_NAME) / BLS_FILE
    if bls.resolve() != source.resolve():
        bls.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, bls)
    written += [bls, write_labels(model_dir(repository, FIELD_NAME))]
    return written
