"""`smearscope bench operating-point`: the served decision, model file by model file (issue 37).

The same crops (the lab's validation fields, cut as the job cuts them, and the NIH validation
patients' cells) through every form of the classifier a server may run: FP32 (the source ONNX,
upcast), the QDQ INT8 ONNX under ONNX Runtime (what `auto` serves on AVX2 CPUs) and NNCF's INT8
under OpenVINO (what `auto` serves on VNNI/AMX CPUs); each at the published threshold: infected and
uninfected cells called Parasitized, per-field parasitemia against the annotated, calls that differ
from FP32's, and the NIH accuracy at 0.5 the INT8 gate checks today.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cells.contract import MODEL_NAME, PARASITIZED
from cells.repository import DEFAULT_REPOSITORY


@dataclass(frozen=True)
class OperatingPointOptions:
    annotations: Path
    field_images: Path
    nih: Path
    repository: Path = DEFAULT_REPOSITORY
    out: Path = Path("bench/results/operating-point.json")
    threads: int = 2


def _forms(repository: Path, scratch: Path) -> dict:
    """Each served form of the classifier: (runtime, model file)."""
    from cells.repository import engine_source, openvino_model, served_onnx
    from export.cpu_model import upcast_to_fp32

    return {
        "FP32 (source ONNX), ONNX Runtime": ("onnxruntime", upcast_to_fp32(engine_source(repository, MODEL_NAME),
                                                                          scratch / "model.fp32.onnx")),
        "QDQ INT8, ONNX Runtime": ("onnxruntime", served_onnx(repository, MODEL_NAME)),
        "NNCF INT8, OpenVINO": ("openvino", openvino_model(repository, MODEL_NAME)),
    }


def decision_row(p_parasitized: np.ndarray, infected: np.ndarray, threshold: float, prefix: str,
                 fields: list[str] | None = None) -> dict:
    """The served decision on labelled cells: infected and uninfected cells called Parasitized at
    `threshold` and, given each cell's field, the mean over fields of |called % − annotated %|."""
    called = p_parasitized >= threshold
    row = {f"{prefix}infected_called_parasitized": float(called[infected].mean()),
           f"{prefix}uninfected_called_parasitized": float(called[~infected].mean())}
    if fields is not None:
        names = np.array(fields)
        row[f"{prefix}parasitemia_mae_points"] = float(np.mean(
            [abs(100 * called[names == n].mean() - 100 * infected[names == n].mean()) for n in set(fields)]))
    return row


def bench_operating_point(options: OperatingPointOptions) -> dict:
    from bench.batch import cpu_model_name
    from cells.decision import read_decision
    from cells.repository import adapt_split, model_dir
    from cells.runtime import RUNTIMES
    from export.pipeline import lab_validation_cells
    from train.data import list_samples, load_cells

    split_path = adapt_split(options.repository, MODEL_NAME)
    split = json.loads(split_path.read_text())
    threshold = read_decision(model_dir(options.repository, MODEL_NAME)).threshold
    # The lab's validation fields, cut as `smearscope adapt` evaluated them (the job's finder and crops).
    lab = lab_validation_cells(options.repository, options.annotations, options.field_images, split_path)
    patients = set(split["nih"]["val_patients"])
    nih = load_cells([s for s in list_samples(options.nih) if s.patient in patients])
    infected_lab, infected_nih = lab.labels == PARASITIZED, nih.labels == PARASITIZED
    rows, calls = {}, {}
    with tempfile.TemporaryDirectory(prefix="smearscope-operating-point-") as scratch:
        for name, (runtime, path) in _forms(options.repository, Path(scratch)).items():
            model = RUNTIMES[runtime](path, batch_size=64, threads=options.threads)
            p_lab, p_nih = model(lab.images)[:, PARASITIZED], model(nih.images)[:, PARASITIZED]
            calls[name] = (p_lab >= threshold, p_nih >= threshold)
            rows[name] = {"runtime": runtime, "model": str(path),
                          **decision_row(p_lab, infected_lab, threshold, "lab_", lab.fields),
                          **decision_row(p_nih, infected_nih, threshold, "nih_"),
                          "nih_accuracy_at_0.5": float(((p_nih >= 0.5) == infected_nih).mean())}
    reference = next(iter(calls))
    for name in rows:
        rows[name]["lab_calls_differing_from_fp32"] = int((calls[name][0] != calls[reference][0]).sum())
        rows[name]["nih_calls_differing_from_fp32"] = int((calls[name][1] != calls[reference][1]).sum())
    result = {"cpu": cpu_model_name(), "threshold": threshold, "lab_cells": int(len(lab.labels)),
              "lab_infected": int(infected_lab.sum()), "lab_fields": len(set(lab.fields)),
              "nih_cells": int(len(nih.labels)), "nih_infected": int(infected_nih.sum()), "forms": rows}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result
