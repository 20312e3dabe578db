"""Stand-in models for measuring the pipeline around the models (`smearscope bench feed`).

Same names, contracts and Triton configs as the released models, at almost no compute: the
classifier answers fixed probabilities; the detector answers the real detector's maps for the
fields it was recorded on, picked by each input's pixel sum, so cells are found, cropped and
classified exactly as in a real run of those fields. ONNX graphs, served like the real ones.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cells.contract import (
    CHANNELS, DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT, IMAGE_SIZE, INPUT_NAME, MODEL_NAME, OUTPUT_NAME,
)
from cells.errors import BadInput

FIXED_PROBABILITIES = (0.1, 0.9)  # p(Parasitized), p(Uninfected): every cell Uninfected at any threshold below 0.9


def _save(graph, path: Path) -> None:
    import onnx

    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def classifier_graph(path: Path) -> None:
    """uint8 crops [N, 128, 128, 3] -> FIXED_PROBABILITIES for each, [N, 2]."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Shape", [INPUT_NAME], ["shape"], start=0, end=1),
        helper.make_node("Concat", ["shape", "two"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["answer", "out_shape"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes, "stand_in_classifier",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE, CHANNELS])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(np.array([2], np.int64), "two"),
                     numpy_helper.from_array(np.array(FIXED_PROBABILITIES, np.float32), "answer")],
    )
    _save(graph, path)


def detector_graph(path: Path, inputs: np.ndarray, maps: np.ndarray) -> None:
    """uint8 fields [N, H, W, 3] -> the recorded maps [N, H, W, 2] of the recorded input with the
    nearest pixel sum (`inputs`: [K, H, W, 3], `maps`: [K, H, W, 2], K distinct fields of one size)."""
    from onnx import TensorProto, helper, numpy_helper

    sums = inputs.reshape(len(inputs), -1).sum(axis=1, dtype=np.float64).astype(np.float32)
    if len(np.unique(sums)) != len(sums):
        raise BadInput("two recorded fields have the same pixel sum: use distinct fields")
    height, width = inputs.shape[1:3]
    nodes = [
        helper.make_node("Cast", [DETECTOR_INPUT], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["pixels", "axes"], ["sums"], keepdims=0),
        helper.make_node("Unsqueeze", ["sums", "last"], ["column"]),
        helper.make_node("Sub", ["column", "recorded_sums"], ["difference"]),
        helper.make_node("Abs", ["difference"], ["distance"]),
        helper.make_node("ArgMin", ["distance"], ["index"], axis=1, keepdims=0),
        helper.make_node("Gather", ["recorded_maps", "index"], [DETECTOR_OUTPUT], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "stand_in_detector",
        [helper.make_tensor_value_info(DETECTOR_INPUT, TensorProto.UINT8, ["N", height, width, CHANNELS])],
        [helper.make_tensor_value_info(DETECTOR_OUTPUT, TensorProto.FLOAT, ["N", height, width, 2])],
        initializer=[numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
                     numpy_helper.from_array(np.array([1], np.int64), "last"),
                     numpy_helper.from_array(sums, "recorded_sums"),
                     numpy_helper.from_array(maps.astype(np.float32), "recorded_maps")],
    )
    _save(graph, path)


def record_detector(repository: Path, fields: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The real detector's inputs and maps for `fields`, as the batch job would send them."""
    from fields.slides import decode
    from cells.detect import detector_input
    from cells.repository import served_onnx
    from cells.runtime import OnnxModel

    model = OnnxModel(served_onnx(repository, DETECTOR_NAME), batch_size=1, input_name=DETECTOR_INPUT,
                      output_name=DETECTOR_OUTPUT)
    inputs = [detector_input(decode(path.read_bytes()))[0] for path in fields]
    if len({i.shape for i in inputs}) != 1:
        raise BadInput("the recorded fields must have one size")
    inputs = np.stack(inputs)
    return inputs, np.concatenate([model(field[None]) for field in inputs])


def stand_in_repository(repository: Path, fields: list[Path], out: Path) -> Path:
    """A copy of `repository`'s configs (and decision rule) with stand-in models for its classifier
    and detector; the detector recorded on `fields`."""
    from export.field_model import write_field_model
    from export.triton_config import DETECTOR_SERVING, ServingParameters, write_model_config
    from cells.repository import served_onnx

    inputs, maps = record_detector(repository, fields)
    for name in (MODEL_NAME, DETECTOR_NAME):
        shutil.copytree(repository / name, out / name, ignore=shutil.ignore_patterns("*.onnx", "*.plan", "source"))
    classifier_graph(served_onnx(out, MODEL_NAME))
    detector_graph(served_onnx(out, DETECTOR_NAME), inputs, maps)
    write_model_config(out, ServingParameters())
    write_model_config(out, DETECTOR_SERVING)
    write_field_model(out)  # the field model and its crop graph: real, they are not models to stand in for
    return out
