"""The export command: Keras model -> parity-gated ONNX (FP32/FP16) [-> TensorRT] -> Triton repository."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from smearscope.cli import DEFAULT_PARITY_DATA
from export.onnx_model import keras_to_onnx, to_fp16
from export.tensorrt import EngineProfile, TensorRTUnavailable, build_engine
from export.triton_config import VERSION, ServingParameters, write_model_config

FP32_TOLERANCE = 1e-4
FP16_MIN_AGREEMENT = 0.995
REPORT_FILE = "export_report.json"


class ExportError(RuntimeError):
    """The export cannot produce a repository that serves the same answers as the Keras model."""


@dataclass
class ExportOptions:
    model: Path
    repository: Path
    serving: ServingParameters = field(default_factory=ServingParameters)
    fp16: bool = True
    tensorrt: bool = False
    opt_batch: int = 64
    parity_data: Path = DEFAULT_PARITY_DATA
    work_dir: Path | None = None


def _log(message: str) -> None:
    print(f"export: {message}", flush=True)


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max |diff| of probabilities and the share of identical predicted classes."""
    return {
        "max_abs_diff": float(np.max(np.abs(reference - candidate))) if len(reference) else 0.0,
        "class_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))) if len(reference) else 1.0,
    }


def check_gate(fp32: dict, fp16: dict | None) -> list[str]:
    """Reasons the export fails its parity gate (empty when it passes)."""
    failures = []
    if fp32["max_abs_diff"] > FP32_TOLERANCE or fp32["class_agreement"] < 1.0:
        failures.append(
            f"FP32 ONNX differs from Keras: max |diff| {fp32['max_abs_diff']:.2e} (limit {FP32_TOLERANCE:g}), "
            f"class agreement {fp32['class_agreement']:.2%}"
        )
    if fp16 is not None and fp16["class_agreement"] < FP16_MIN_AGREEMENT:
        failures.append(f"FP16 ONNX class agreement {fp16['class_agreement']:.2%} < {FP16_MIN_AGREEMENT:.1%}")
    return failures


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "onnxconverter-common"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _writable_repository(repository: Path) -> None:
    try:
        repository.mkdir(parents=True, exist_ok=True)
        probe = repository / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ExportError(f"repository {repository} is not writable: {error.strerror or error}") from error


def export(options: ExportOptions) -> dict:
    """Run every step; nothing is written to the repository unless the parity gate passes."""
    import keras

    from cells.runtime import OnnxClassifier
    from train.data import list_samples, load_cells
    from train.evaluate import keras_predictor

    started = time.monotonic()
    model_path = Path(options.model)
    if not model_path.is_file():
        raise ExportError(f"model not found: {model_path}")
    _writable_repository(Path(options.repository))
    profile = EngineProfile(opt_batch=options.opt_batch, max_batch=options.serving.max_batch_size, fp16=options.fp16)
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as error:  # noqa: BLE001 - any load failure means "not a usable Keras model"
        raise ExportError(f"cannot load {model_path} as a Keras model: {str(error).splitlines()[0][:200]}") from error
    _log(f"loaded {model_path} ({model.count_params():,} parameters)")

    work = Path(options.work_dir or model_path.parent / "export")
    work.mkdir(parents=True, exist_ok=True)
    fp32_path = keras_to_onnx(model, work / "model.fp32.onnx")
    _log(f"ONNX FP32 written: {fp32_path} ({fp32_path.stat().st_size / 1e6:.1f} MB)")
    fp16_path = to_fp16(fp32_path, work / "model.fp16.onnx") if options.fp16 else None
    if fp16_path:
        _log(f"ONNX FP16 written: {fp16_path} ({fp16_path.stat().st_size / 1e6:.1f} MB)")

    cells = load_cells(list_samples(options.parity_data))
    reference = keras_predictor(model)(cells.images)
    fp32 = parity(reference, OnnxClassifier(fp32_path)(cells.images))
    fp16 = parity(reference, OnnxClassifier(fp16_path)(cells.images)) if fp16_path else None
    _log(f"parity on {len(cells.labels)} cells of {options.parity_data}: FP32 {fp32}" + (f", FP16 {fp16}" if fp16 else ""))
    failures = check_gate(fp32, fp16)
    report = {
        "source_model": str(model_path),
        "source_sha256": _sha256(model_path),
        "parameters": model.count_params(),
        "parity_data": str(options.parity_data),
        "parity_images": int(len(cells.labels)),
        "fp32_vs_keras": fp32,
        "fp16_vs_keras": fp16,
        "sizes_bytes": {"onnx_fp32": fp32_path.stat().st_size, "onnx_fp16": fp16_path.stat().st_size if fp16_path else None},
        "served_onnx": "fp16" if fp16_path else "fp32",
        "tensorrt_profile": profile.shapes(),
        "versions": _versions(),
        "gate_passed": not failures,
    }
    if failures:
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2))
        raise ExportError("parity gate failed, repository not written: " + "; ".join(failures))

    model_dir = Path(options.repository) / options.serving.name
    version_dir = model_dir / str(VERSION)
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fp16_path or fp32_path, version_dir / "model.onnx")
    (version_dir / "model.plan").unlink(missing_ok=True)
    tensorrt_error = None
    if options.tensorrt:
        try:
            report["tensorrt"] = build_engine(fp32_path, version_dir / "model.plan", profile, work / "timing.cache")
            _log(f"TensorRT engine written: {version_dir / 'model.plan'}")
        except TensorRTUnavailable as error:
            tensorrt_error = str(error)
    config = write_model_config(Path(options.repository), options.serving)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    (model_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    _log(f"repository written: {config} ({report['wall_seconds']}s)")
    if tensorrt_error:
        raise ExportError(f"{tensorrt_error} (the repository keeps its ONNX model)")
    return report
