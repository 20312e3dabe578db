"""The export command: Keras model -> parity-gated ONNX (FP32/FP16) [-> TensorRT] -> Triton repository."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path


from cells.contract import DETECTOR_NAME, OPT_BATCH_SIZE
from cells.decision import read_decision
from cells.errors import UserError, first_line
from cells import repository as layout
from export.cpu_model import gate_cells, int8_models
from export.onnx_model import keras_to_onnx, to_fp16
from export.parity import DEFAULT_PARITY_DATA, check_gate, parity
from export.tensorrt import EngineProfile, TensorRTUnavailable, build_engine
from export.triton_config import ServingParameters, write_model_config

REPORT_FILE = "export_report.json"


class ExportError(UserError, RuntimeError):
    """The export cannot produce a repository that serves the same answers as the Keras model."""


@dataclass
class ExportOptions:
    model: Path
    repository: Path
    serving: ServingParameters = field(default_factory=ServingParameters)
    fp16: bool = True
    tensorrt: bool = False
    opt_batch: int = OPT_BATCH_SIZE
    parity_data: Path = DEFAULT_PARITY_DATA
    int8: bool = True  # serve an INT8 model to CPUs (export/cpu_model.py), gated on validation cells
    calibration_data: Path | None = None  # labelled cells for INT8 calibration and its gate; default parity_data
    split: Path | None = None  # a run's split.json: calibrate on its training patients, gate on its validation ones
    fields: tuple[Path, Path] | None = None  # a lab's (annotations, field images): gate INT8 on the served decision too
    work_dir: Path | None = None


def log(message: str) -> None:
    print(f"export: {message}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    versions = {}
    for package in ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "onnxconverter-common"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def writable_repository(repository: Path) -> None:
    try:
        repository.mkdir(parents=True, exist_ok=True)
        probe = repository / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ExportError(f"repository {repository} is not writable: {error.strerror or error}") from error


def copy_decision(run: Path, model_dir: Path) -> float | None:
    """The run's decision.json (its threshold, `smearscope adapt`) goes with the model; a model without
    one removes the old one, whose threshold was chosen for another model. Returns the threshold."""
    from cells.decision import DECISION_FILE

    target = model_dir / DECISION_FILE
    target.unlink(missing_ok=True)
    if not (run / DECISION_FILE).is_file():
        return None
    threshold = read_decision(run).threshold  # refuses a file that is not a decision
    shutil.copyfile(run / DECISION_FILE, target)
    log(f"decision threshold {threshold:.4f} written: {target}")
    return threshold


def export(options: ExportOptions) -> dict:
    """Run every step; nothing is written to the repository unless the parity gate passes."""
    import keras

    from cells.runtime import OnnxModel
    from train.data import list_samples, load_cells
    from train.evaluate import keras_predictor

    started = time.monotonic()
    model_path = Path(options.model)
    if not model_path.is_file():
        raise ExportError(f"model not found: {model_path}")
    writable_repository(Path(options.repository))
    profile = EngineProfile(opt_batch=options.opt_batch, max_batch=options.serving.max_batch_size, fp16=options.fp16)
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as error:  # noqa: BLE001 - any load failure means "not a usable Keras model"
        raise ExportError(f"cannot load {model_path} as a Keras model: {first_line(error)}") from error
    log(f"loaded {model_path} ({model.count_params():,} parameters)")

    work = Path(options.work_dir or model_path.parent / "export")
    work.mkdir(parents=True, exist_ok=True)
    fp32_path = keras_to_onnx(model, work / "model.fp32.onnx")
    log(f"ONNX FP32 written: {fp32_path} ({fp32_path.stat().st_size / 1e6:.1f} MB)")
    fp16_path = to_fp16(fp32_path, work / "model.fp16.onnx") if options.fp16 else None
    if fp16_path:
        log(f"ONNX FP16 written: {fp16_path} ({fp16_path.stat().st_size / 1e6:.1f} MB)")

    cells = load_cells(list_samples(options.parity_data))
    reference = keras_predictor(model)(cells.images)
    fp32 = parity(reference, OnnxModel(fp32_path)(cells.images))
    fp16 = parity(reference, OnnxModel(fp16_path)(cells.images)) if fp16_path else None
    log(f"parity on {len(cells.labels)} cells of {options.parity_data}: FP32 {fp32}" + (f", FP16 {fp16}" if fp16 else ""))
    failures = check_gate(fp32, fp16)
    int8_paths, int8_reports = {}, {}
    if options.int8:
        int8_paths, int8_reports, int8_failures = gated_int8(
            fp32_path, work, options.calibration_data or options.parity_data, options.split, options.repository,
            options.fields, model_path.parent / "split.json", read_decision(model_path.parent).threshold)
        failures += int8_failures
    int8_path = int8_paths.get("onnxruntime")
    report = {
        "source_model": layout.released_path(model_path),
        "source_sha256": sha256(model_path),
        "parameters": model.count_params(),
        "parity_data": layout.released_path(options.parity_data),
        "parity_images": int(len(cells.labels)),
        "fp32_vs_keras": fp32,
        "fp16_vs_keras": fp16,
        "int8_vs_fp32": int8_reports.get("onnxruntime"),
        "openvino_int8_vs_fp32": int8_reports.get("openvino"),
        "sizes_bytes": {"onnx_fp32": fp32_path.stat().st_size, "onnx_fp16": fp16_path.stat().st_size if fp16_path else None},
        "served_onnx": "int8" if int8_path else "fp16" if fp16_path else "fp32",
        "tensorrt_profile": profile.shapes(),
        "versions": versions(),
        "gate_passed": not failures,
    }
    if failures:
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2))
        raise ExportError("parity gate failed, repository not written: " + "; ".join(failures))

    model_dir = layout.model_dir(options.repository, options.serving.name)
    version_dir = layout.version_dir(options.repository, options.serving.name)
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(int8_path or fp16_path or fp32_path, layout.served_onnx(options.repository, options.serving.name))
    source = layout.source_onnx(options.repository, options.serving.name)
    source.unlink(missing_ok=True)
    if int8_path:
        source.parent.mkdir(exist_ok=True)
        shutil.copyfile(fp16_path or fp32_path, source)
    install_openvino(int8_paths.get("openvino"), layout.openvino_model(options.repository, options.serving.name))
    (version_dir / "model.plan").unlink(missing_ok=True)
    tensorrt_error = None
    if options.tensorrt:
        try:
            report["tensorrt"] = build_engine(fp32_path, version_dir / "model.plan", profile, work / "timing.cache")
            log(f"TensorRT engine written: {version_dir / 'model.plan'}")
        except TensorRTUnavailable as error:
            tensorrt_error = str(error)
    report["decision"] = copy_decision(model_path.parent, model_dir)
    config = write_model_config(Path(options.repository), options.serving)  # publishes the decision rule
    if options.serving.kind == "classifier":
        from export.field_model import write_field_model

        write_field_model(Path(options.repository))  # the field model, composed with the detector beside it
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    (model_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    log(f"repository written: {config} ({report['wall_seconds']}s)")
    if tensorrt_error:
        raise ExportError(f"{tensorrt_error} (the repository keeps its ONNX model)")
    return report


def install_openvino(model: Path | None, target: Path) -> None:
    """OpenVINO's model (model.xml and its model.bin) into the version folder, or, without one, no
    stale one left there."""
    for suffix in (".xml", ".bin"):
        target.with_suffix(suffix).unlink(missing_ok=True)
        if model is not None:
            shutil.copyfile(model.with_suffix(suffix), target.with_suffix(suffix))


def lab_validation_cells(repository: Path, annotations: Path, images: Path, split: Path | None):
    """A lab's labelled cells, cut as the job cuts them (the repository's learned finder, stain-normalised):
    those of the validation fields of `split` (an adapted run's split.json), or of every annotated field."""
    from cells.detect import onnx_finder
    from train.fields import load_field_cells

    info = json.loads(split.read_text()) if split is not None and split.is_file() else {}
    names = set(info["val_fields"]) if "val_fields" in info else None
    finder = onnx_finder(repository if layout.served_onnx(repository, DETECTOR_NAME).is_file() else layout.DEFAULT_REPOSITORY,
                         keep_border=False)
    return load_field_cells(annotations, images, finder, True, names=names)


def gated_int8(fp32: Path, work: Path, data: Path, split: Path | None, repository: Path,
               fields: tuple[Path, Path] | None, fields_split: Path, threshold: float) -> tuple[dict, dict, list[str]]:
    """Both INT8 models of `fp32`, calibrated on the cells of `data` (a run's training patients, given
    its `split`) and gated on its validation cells and, given a lab's (annotations, images), on the
    served decision at `threshold` over the lab's validation fields (those of `fields_split`):
    ({runtime: INT8 path}, {runtime: gate report}, reasons they fail)."""
    calibration, validation = gate_cells(data, split)
    lab = lab_validation_cells(repository, *fields, fields_split) if fields else None
    models, reports, failures = int8_models(fp32, work, calibration, validation, lab, threshold)
    log(f"INT8 on {len(validation.labels)} validation cells: {reports}")
    return models, reports, failures


def quantize_repository(repository: Path, name: str, data: Path, split: Path | None, work: Path,
                        fields: tuple[Path, Path] | None = None) -> dict:
    """Give an exported repository its INT8 CPU models (no Keras needed): the served ONNX moves to
    source/ for GPU engines, the gated INT8 ONNX takes its place and OpenVINO's INT8 goes beside
    it. With `fields` (a lab's annotations and field images), each INT8 model is also gated on the
    served decision over the lab's validation fields. Nothing changes if a gate fails."""
    from export.cpu_model import upcast_to_fp32

    served, source = layout.served_onnx(repository, name), layout.source_onnx(repository, name)
    original = layout.engine_source(repository, name)
    if not original.is_file():
        raise ExportError(f"no ONNX model to quantise in {served.parent}")
    model_dir = layout.model_dir(repository, name)
    max_batch = layout.read_model_config(model_dir).max_batch_size
    work.mkdir(parents=True, exist_ok=True)
    fp32 = upcast_to_fp32(original, work / "model.fp32.onnx")
    models, reports, failures = gated_int8(fp32, work, data, split, repository, fields,
                                           layout.adapt_split(repository, name), read_decision(model_dir).threshold)
    if failures:
        raise ExportError("INT8 gate failed, repository unchanged: " + "; ".join(failures))
    if not source.is_file():
        source.parent.mkdir(exist_ok=True)
        shutil.move(served, source)
    shutil.copyfile(models["onnxruntime"], served)
    install_openvino(models["openvino"], layout.openvino_model(repository, name))
    report_path = model_dir / REPORT_FILE
    export_report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    export_report |= {"int8_vs_fp32": reports["onnxruntime"], "openvino_int8_vs_fp32": reports["openvino"],
                      "served_onnx": "int8", "int8_source": layout.released_path(original)}
    report_path.write_text(json.dumps(export_report, indent=2))
    config = write_model_config(Path(repository), ServingParameters(name=name, max_batch_size=max_batch))
    log(f"{served} is INT8 now, {layout.openvino_model(repository, name)} OpenVINO's INT8; {source} keeps the "
        f"model GPU engines are built from; configs written: {config}")
    return reports
