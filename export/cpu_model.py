"""The fast CPU models: INT8 for each CPU runtime, calibrated on the same real crops, gated alike.

FP16 ONNX has no fast CPU kernels (ONNX Runtime casts around FP32 ones), so CPU repositories serve
INT8: for ONNX Runtime, static quantisation to QDQ (weights int8 per output channel, activations
uint8, ranges at the 99.999th percentile); for OpenVINO, NNCF's post-training quantisation to its
own model (model.xml + model.bin). Both calibrate on the same crops, drawn at random from the
training patients (drawn half from each class instead, both lost more accuracy:
docs/performance.md). Each may lose at most 0.5 points of accuracy against FP32 on the validation
patients and, given a lab's fields, may move the served decision on its validation fields by at
most the tolerance below, so that every runtime serves one operating point
(docs/operating-point.md). Their kernels use VNNI (AVX-512 or AVX2) or AMX where the CPU has them,
plain AVX2 otherwise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cells.contract import INPUT_NAME

CALIBRATION_BATCH = 32
CALIBRATION_COUNT = 512  # crops whose activation ranges set the INT8 scales
MAX_ACCURACY_DROP = 0.005  # the gate: INT8 may lose at most 0.5 points of accuracy against FP32
# The served decision's gate (docs/operating-point.md), on a lab's validation cells at the published
# threshold: INT8 may call at most 2 points (or one cell, where a point is less than a cell) more or
# fewer infected cells Parasitized than FP32, and at most 0.2 points more or fewer uninfected ones.
MAX_SENSITIVITY_SHIFT = 0.02
MAX_FALSE_CALL_SHIFT = 0.002


def upcast_to_fp32(source: Path, out: Path) -> Path:
    """An FP32 copy of an FP16 ONNX model (exact: every FP16 value is an FP32 value).

    The released repository keeps only the FP16 model; quantisation and the TensorRT builder want FP32.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph

    def upcast_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == TensorProto.FLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    for tensor in graph.initializer:
        upcast_tensor(tensor)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                upcast_tensor(attribute.t)
            elif node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """Static INT8 quantisation (QDQ, per-channel weights) with activation ranges from `calibration` crops.

    Each activation's range ends at the 99.999th percentile of its calibration values, not at their
    extremes: with the extremes, a few outliers widen the ranges and p(parasitized) drops by 0.46 in
    logit around the served threshold, 9 of 46 infected lab cells lost (docs/operating-point.md).
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Crops(CalibrationDataReader):
        """The calibration crops in batches; ORT collects one batch at a time (CalibStridedMinMax), so the
        activations it holds for the histograms stay one batch's (1.8 GB, not 23 GB for 512 crops)."""

        def __init__(self) -> None:
            self.all = [calibration[i : i + CALIBRATION_BATCH] for i in range(0, len(calibration), CALIBRATION_BATCH)]
            self.set_range(0, len(self.all))

        def __len__(self) -> int:
            return len(self.all)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.batches = iter(self.all[start_index:end_index])

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = out.with_suffix(".prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    # The softmax stays FP32: quantised, the served probabilities fall on a 1/255 grid and no longer sum to one.
    softmax = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Softmax"]
    quantize_static(
        str(prepared), str(out), Crops(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile,
        nodes_to_exclude=softmax, extra_options={"CalibStridedMinMax": 1},
    )
    prepared.unlink(missing_ok=True)
    return out


def openvino_int8(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """NNCF's INT8 for OpenVINO (its defaults: symmetric ranges, fast bias correction), with activation
    ranges from `calibration` crops; `out` is the model.xml, its model.bin beside it."""
    import nncf
    import openvino as ov

    batches = [calibration[i : i + CALIBRATION_BATCH] for i in range(0, len(calibration), CALIBRATION_BATCH)]
    quantized = nncf.quantize(ov.Core().read_model(str(fp32)), nncf.Dataset(batches), subset_size=len(batches))
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out))
    return out


def gate_int8(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, name: str) -> tuple[dict, list[str]]:
    """Accuracy of both on labelled validation cells; INT8 may lose at most MAX_ACCURACY_DROP of it."""
    accuracy32 = float(np.mean(fp32.argmax(1) == labels)) if len(labels) else 1.0
    accuracy8 = float(np.mean(int8.argmax(1) == labels)) if len(labels) else 1.0
    report = {
        "validation_images": int(len(labels)),
        "fp32_accuracy": accuracy32,
        "int8_accuracy": accuracy8,
        "accuracy_drop_points": round(100 * (accuracy32 - accuracy8), 3),
        "class_agreement": float(np.mean(fp32.argmax(1) == int8.argmax(1))) if len(labels) else 1.0,
        "max_abs_diff": float(np.max(np.abs(fp32 - int8))) if len(labels) else 0.0,
    }
    failures = []
    if accuracy32 - accuracy8 > MAX_ACCURACY_DROP:
        failures.append(
            f"{name} accuracy {accuracy8:.2%} is {100 * (accuracy32 - accuracy8):.2f} points below FP32 "
            f"{accuracy32:.2%} on {len(labels)} validation cells (limit {100 * MAX_ACCURACY_DROP:.1f})"
        )
    return report, failures


def gate_cells(data: Path, split: Path | None, calibration_count: int = CALIBRATION_COUNT, seed: int = 0):
    """(calibration crops, validation CellSet): a run's training and validation patients with a split.json,
    else every cell of `data` for both (the bundled fixtures)."""
    import json
    import random

    from cells.errors import BadInput
    from train.data import list_samples, load_cells

    samples = list_samples(data)
    calibration, validation = samples, samples
    if split is not None:
        info = json.loads(Path(split).read_text())
        if "train_patients" not in info or "val_patients" not in info:
            raise BadInput(f"{split} has no train_patients/val_patients (expected a run's split.json)")
        calibration = [s for s in samples if s.patient in set(info["train_patients"])]
        validation = [s for s in samples if s.patient in set(info["val_patients"])]
        if not calibration or not validation:
            raise BadInput(f"the patients of {split} have no cells in {data}")
    calibration = random.Random(seed).sample(calibration, min(calibration_count, len(calibration)))
    return load_cells(calibration).images, load_cells(validation)


def gate_decision(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, threshold: float,
                  name: str) -> tuple[dict, list[str]]:
    """The served decision of both on a lab's labelled validation cells: infected and uninfected cells
    called Parasitized at `threshold`; INT8 may move them by at most MAX_SENSITIVITY_SHIFT (or one
    infected cell) and MAX_FALSE_CALL_SHIFT."""
    from cells.contract import PARASITIZED

    infected = np.asarray(labels) == PARASITIZED
    called32, called8 = fp32[:, PARASITIZED] >= threshold, int8[:, PARASITIZED] >= threshold

    def share(called: np.ndarray, rows: np.ndarray) -> float:
        return float(called[rows].mean()) if rows.any() else 0.0

    report = {"threshold": threshold, "lab_cells": int(len(labels)), "lab_infected": int(infected.sum()),
              "fp32_infected_called_parasitized": share(called32, infected),
              "int8_infected_called_parasitized": share(called8, infected),
              "fp32_uninfected_called_parasitized": share(called32, ~infected),
              "int8_uninfected_called_parasitized": share(called8, ~infected),
              "calls_differing": int((called32 != called8).sum())}
    sensitivity = report["int8_infected_called_parasitized"] - report["fp32_infected_called_parasitized"]
    false_calls = report["int8_uninfected_called_parasitized"] - report["fp32_uninfected_called_parasitized"]
    allowed = max(MAX_SENSITIVITY_SHIFT, 1 / infected.sum() if infected.any() else 0.0)
    failures = []
    if abs(sensitivity) > allowed + 1e-9:
        failures.append(f"{name} calls {100 * sensitivity:+.1f} points of the lab's infected cells Parasitized against "
                        f"FP32 at the served threshold {threshold:.4f} (limit {100 * allowed:.1f})")
    if abs(false_calls) > MAX_FALSE_CALL_SHIFT + 1e-9:
        failures.append(f"{name} calls {100 * false_calls:+.2f} points of the lab's uninfected cells Parasitized against "
                        f"FP32 at the served threshold {threshold:.4f} (limit {100 * MAX_FALSE_CALL_SHIFT:.1f})")
    return report, failures


def int8_models(fp32: Path, work: Path, calibration: np.ndarray, validation, lab=None,
                threshold: float | None = None) -> tuple[dict[str, Path], dict, list[str]]:
    """Quantise for both runtimes, then gate each on the validation cells and, given a lab's labelled
    validation cells (`lab`: images, labels) and the served `threshold`, on the served decision:
    ({runtime: INT8 path}, {runtime: gate report}, reasons they fail)."""
    from cells.runtime import RUNTIMES, OnnxModel

    models = {"onnxruntime": quantize_int8(fp32, Path(work) / "model.int8.onnx", calibration),
              "openvino": openvino_int8(fp32, Path(work) / "openvino" / "model.xml", calibration)}
    fp32_model = OnnxModel(fp32)
    reference = fp32_model(validation.images)
    lab_reference = fp32_model(lab.images) if lab is not None else None
    reports, failures = {}, []
    for runtime, path in models.items():
        model = RUNTIMES[runtime](path)
        reports[runtime], failed = gate_int8(reference, model(validation.images), validation.labels, f"{runtime} INT8")
        reports[runtime] |= {"calibration_images": int(len(calibration)),
                             "int8_bytes": sum(f.stat().st_size for f in path.parent.glob(f"{path.stem}.*"))}
        failures += failed
        if lab is not None:
            reports[runtime]["served_decision"], failed = gate_decision(lab_reference, model(lab.images), lab.labels,
                                                                        threshold, f"{runtime} INT8")
            failures += failed
    return models, reports, failures
