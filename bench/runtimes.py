"""`smearscope bench runtimes`: ONNX Runtime against OpenVINO on this CPU, for both models, in one run.

Each runtime and model in a process of its own, on the same inputs: the classifier on the crops of
real fields (the shipped INT8 models: ONNX Runtime's QDQ ONNX and OpenVINO's own NNCF model; and
their FP32 source), the detector on the same fields at its input size. Each runtime runs what and
how the embedded server would: OpenVINO splits the classifier's batches over its CPU streams.
Reported: img/s (fields/s), core-ms per image, peak RSS of the process, and how far each OpenVINO
answer is from ONNX Runtime's (largest probability difference and share of calls that agree at the
model's threshold; for the detector, F1 of its cells against ONNX Runtime's). Given the fields'
annotations, also the served decision of each classifier file on every annotated one of them
(issue 37: one operating point whatever runtime a CPU gets; give it fields the model was not
adapted on). `cells/runtime.py`'s `MEASURED_FASTER` is written from these reports, one per kind of
CPU.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.batch import cpu_model_name, field_paths, in_child, rate
from cells.contract import DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT, DETECTOR_SCALE, MODEL_NAME, PARASITIZED
from cells.repository import DEFAULT_REPOSITORY


@dataclass(frozen=True)
class RuntimeBenchOptions:
    fields: Path = Path("tests/fixtures/smears")
    repository: Path = DEFAULT_REPOSITORY
    out: Path = Path("bench/results/runtimes.json")
    max_fields: int = 20
    threads: int = 2
    batch_size: int = 64
    annotations: Path | None = None  # the fields' annotations: report the calls at the operating point too


def _inputs(paths: list[Path], scratch: Path) -> tuple[Path, Path]:
    """The fields' crops (classical finder: no model in the way) and detector inputs, saved for the children."""
    from fields.slides import decode, find_classical
    from cells.detect import detector_input
    from cells.find import cell_crops
    from cells.stain import normalise_stain

    crops, smalls = [], []
    for path in paths:
        image = decode(path.read_bytes())
        crops.append(normalise_stain(cell_crops(image, find_classical(image))))
        smalls.append(detector_input(image)[0])
    np.save(scratch / "crops.npy", np.concatenate(crops))
    np.save(scratch / "fields.npy", np.stack(smalls))
    return scratch / "crops.npy", scratch / "fields.npy"


def _timed(runtime: str, model: Path, inputs: Path, answers: Path, threads: int, batch_size: int, detector: bool) -> dict:
    from cells.runtime import RUNTIMES

    names = {"input_name": DETECTOR_INPUT, "output_name": DETECTOR_OUTPUT} if detector else {}
    throughput = {"throughput": not detector} if runtime == "openvino" else {}
    predict = RUNTIMES[runtime](model, batch_size=batch_size, threads=threads, **names, **throughput)
    images = np.load(inputs)
    result = rate(predict, images, batch_size)
    np.save(answers, predict(images))
    return result


def _operating_point(model: dict[str, Path], lab, threshold: float, options: RuntimeBenchOptions) -> dict:
    """Each runtime's file of one classifier at the served threshold on the lab's labelled cells."""
    from bench.operating_point import decision_row
    from cells.runtime import RUNTIMES

    infected = lab.labels == PARASITIZED
    return {runtime: decision_row(RUNTIMES[runtime](path, batch_size=options.batch_size, threads=options.threads)(
                lab.images)[:, PARASITIZED], infected, threshold, "", lab.fields) for runtime, path in model.items()}


def bench_runtimes(options: RuntimeBenchOptions) -> dict:
    from cells.decision import read_decision
    from cells.detection_eval import same_cells_f1
    from cells.repository import engine_source, model_dir, runtime_model, served_onnx
    from export.cpu_model import upcast_to_fp32
    from export.pipeline import lab_validation_cells

    paths = field_paths(options.fields, options.max_fields)
    threshold = read_decision(model_dir(options.repository, MODEL_NAME)).threshold
    models = {"classifier INT8 (shipped)": {runtime: runtime_model(options.repository, MODEL_NAME, runtime)
                                            for runtime in ("onnxruntime", "openvino")}}
    report: dict = {"cpu": cpu_model_name(), "threads": options.threads, "fields": len(paths), "models": {}}
    lab = (lab_validation_cells(options.repository, options.annotations, options.fields, None)
           if options.annotations else None)
    if lab is not None:
        report |= {"threshold": threshold, "lab_cells": int(len(lab.labels)), "lab_fields": len(set(lab.fields)),
                   "lab_infected": int((lab.labels == PARASITIZED).sum())}
    with tempfile.TemporaryDirectory(prefix="smearscope-runtimes-") as scratch:
        scratch = Path(scratch)
        crops, fields = _inputs(paths, scratch)
        fp32 = upcast_to_fp32(engine_source(options.repository, MODEL_NAME), scratch / "fp32.onnx")
        models["classifier FP32"] = {"onnxruntime": fp32, "openvino": fp32}
        detector_onnx = served_onnx(options.repository, DETECTOR_NAME)
        models["detector FP32"] = {"onnxruntime": detector_onnx, "openvino": detector_onnx}
        report["crops"] = int(len(np.load(crops)))
        for label, model in models.items():
            detector = label.startswith("detector")
            inputs, batch = (fields, 1) if detector else (crops, options.batch_size)
            row = {"files": {runtime: path.name for runtime, path in model.items()}}
            for runtime in ("onnxruntime", "openvino"):
                answers = scratch / f"{runtime}.npy"
                timed = in_child(_timed, runtime, model[runtime], inputs, answers, options.threads, batch, detector,
                                 one_blas_thread=True)
                row[runtime] = {"per_s": timed["images_per_s"], "core_ms": timed["core_ms_per_image"],
                                "peak_rss_mib": timed["peak_rss_mib"]}
            ort, ov = np.load(scratch / "onnxruntime.npy"), np.load(scratch / "openvino.npy")
            if detector:
                shape = (ov.shape[1] * DETECTOR_SCALE, ov.shape[2] * DETECTOR_SCALE)  # the default cell size's scale
                row["openvino_cells_f1_vs_onnxruntime"] = same_cells_f1(
                    [(found, wanted, shape, DETECTOR_SCALE) for found, wanted in zip(ov, ort)])
            else:
                row["openvino_max_abs_diff"] = float(np.abs(ov - ort).max())
                row["openvino_calls_agree"] = float(np.mean((ov[:, PARASITIZED] >= threshold)
                                                            == (ort[:, PARASITIZED] >= threshold)))
                if lab is not None:
                    row["operating_point"] = _operating_point(model, lab, threshold, options)
            row["openvino_vs_onnxruntime"] = row["openvino"]["per_s"] / row["onnxruntime"]["per_s"]
            report["models"][label] = row
            print(f"{label}: ONNX Runtime {row['onnxruntime']['per_s']:.1f}/s, OpenVINO {row['openvino']['per_s']:.1f}/s "
                  f"({row['openvino_vs_onnxruntime']:.2f}x)", flush=True)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report
