"""The learned red-cell detector into the repository, beside the classifier, through the same steps.

Keras → ONNX (tf2onnx, dynamic batch, height and width) → FP16 copy; the gate compares both with
Keras on the committed fixture fields at the detector's scale, and nothing is written unless it
passes. The version folder serves FP32 ONNX (7.9 MB) to CPUs, and is also what `smearscope
build-engine --name rbc_detector` builds the FP16 TensorRT plan from on the GPU host; the FP16 ONNX
is only gated, not kept, so the committed weights stay under 10 MB. OpenVINO serves the same FP32
ONNX in its default precision for the CPU (BF16 on AMX or AVX-512 BF16): gated too, its cells against
the FP32 ONNX's (F1 >= 0.99). NNCF's INT8 lost every cell on the IML fields and ran only 1.13x
OpenVINO's BF16 (docs/performance.md), so the detector has no INT8 model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cells import repository as layout
from cells.contract import DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT
from export.onnx_model import keras_to_onnx, to_fp16
from export.pipeline import REPORT_FILE, ExportError, log, sha256, versions, writable_repository
from export.triton_config import DETECTOR_SERVING, write_model_config

DEFAULT_PARITY_FIELDS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "smears"
FP32_MAX_DIFF = 1e-4
FP16_MAX_DIFF = 2e-2  # a map value; the cells found from FP16 maps must also be the same number
OPENVINO_MIN_F1 = 0.99  # OpenVINO's cells (its default precision on this CPU) against the FP32 ONNX's


def parity_fields(folder: Path) -> list[tuple[np.ndarray, float, tuple[int, int]]]:
    """The fixture fields as the detector sees them (uint8 [H, W, 3] at its scale, padded), with
    the factor back to full resolution and the full-resolution shape."""
    from cells.detect import detector_input
    from cells.detection_eval import load_rgb

    images = [load_rgb(path) for path in sorted(Path(folder).glob("*.JPG"))]
    return [(*detector_input(image), image.shape[:2]) for image in images]


def export_detector(model_path: Path, repository: Path, parity_data: Path = DEFAULT_PARITY_FIELDS,
                    work_dir: Path | None = None) -> dict:
    """Convert, gate and write `<repository>/rbc_detector`; returns the export report."""
    import keras

    from cells.detect import cells_from_maps
    from cells.detection_eval import same_cells_f1
    from cells.runtime import OnnxModel, OpenVinoModel

    model_path = Path(model_path)
    if not model_path.is_file():
        raise ExportError(f"model not found: {model_path}")
    writable_repository(Path(repository))
    model = keras.models.load_model(model_path, compile=False)
    work = Path(work_dir or model_path.parent / "export")
    work.mkdir(parents=True, exist_ok=True)
    fp32_path = keras_to_onnx(model, work / "detector.fp32.onnx", DETECTOR_INPUT, (None, None, 3), DETECTOR_OUTPUT)
    fp16_path = to_fp16(fp32_path, work / "detector.fp16.onnx")
    fields = parity_fields(parity_data)
    names = {"batch_size": 1, "input_name": DETECTOR_INPUT, "output_name": DETECTOR_OUTPUT}
    runners = {kind: OnnxModel(path, **names) for kind, path in (("fp32", fp32_path), ("fp16", fp16_path))}
    openvino = OpenVinoModel(fp32_path, **names)
    diffs = {"fp32": 0.0, "fp16": 0.0}
    same_cells, openvino_fields = True, []
    for field, factor, shape in fields:
        reference = np.asarray(model(field[None], training=False))
        maps = {kind: runner(field[None]) for kind, runner in runners.items()}
        for kind in runners:
            diffs[kind] = max(diffs[kind], float(np.max(np.abs(maps[kind] - reference))))
            same_cells &= len(cells_from_maps(maps[kind][0], shape, factor)) == len(cells_from_maps(reference[0], shape, factor))
        openvino_fields.append((openvino(field[None])[0], maps["fp32"][0], shape, factor))
    openvino_f1 = same_cells_f1(openvino_fields)
    log(f"detector parity on {len(fields)} fields: max |diff| FP32 {diffs['fp32']:.2e}, FP16 {diffs['fp16']:.2e}, "
         f"same cells {same_cells}, OpenVINO cells F1 {openvino_f1:.4f}")
    failures = []
    if diffs["fp32"] > FP32_MAX_DIFF:
        failures.append(f"FP32 ONNX maps differ from Keras by {diffs['fp32']:.2e} (limit {FP32_MAX_DIFF:g})")
    if diffs["fp16"] > FP16_MAX_DIFF or not same_cells:
        failures.append(f"FP16 ONNX maps differ by {diffs['fp16']:.2e} (limit {FP16_MAX_DIFF:g}) or find other cells")
    if openvino_f1 < OPENVINO_MIN_F1:
        failures.append(f"OpenVINO's cells F1 {openvino_f1:.4f} against the FP32 ONNX's (limit {OPENVINO_MIN_F1})")
    report = {
        "source_model": str(model_path), "source_sha256": sha256(model_path), "parameters": model.count_params(),
        "parity_fields": len(fields), "max_abs_diff": diffs, "same_cells": bool(same_cells),
        "openvino_cells_f1_vs_fp32": openvino_f1,
        "sizes_bytes": {"onnx_fp32": fp32_path.stat().st_size, "onnx_fp16": fp16_path.stat().st_size},
        "served_onnx": "fp32", "versions": versions(), "gate_passed": not failures,
    }
    if failures:
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2))
        raise ExportError("detector parity gate failed, repository not written: " + "; ".join(failures))
    layout.version_dir(repository, DETECTOR_NAME).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fp32_path, layout.served_onnx(repository, DETECTOR_NAME))
    layout.source_onnx(repository, DETECTOR_NAME).unlink(missing_ok=True)
    config = write_model_config(Path(repository), DETECTOR_SERVING)
    (config.parent / REPORT_FILE).write_text(json.dumps(report, indent=2))
    log(f"repository written: {config}")
    return report
