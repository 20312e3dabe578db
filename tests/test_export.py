"""Export: generated Triton configs, TensorRT plumbing, and a real Keras -> ONNX -> repository run."""
import json
from pathlib import Path

import numpy as np
import pytest

from cells.contract import CLASSES, INPUT_NAME, MODEL_NAME, OUTPUT_NAME
from export.parity import check_gate, parity
from export.tensorrt import EngineProfile, trtexec_command
from cells.repository import read_model_config
from export.triton_config import ServingParameters, write_model_config
from tests.conftest import call_cli


def _repository_with(tmp_path: Path, filename: str) -> Path:
    version = tmp_path / MODEL_NAME / "1"
    version.mkdir(parents=True)
    (version / filename).write_bytes(b"weights")
    return tmp_path


@pytest.mark.parametrize(
    "filename,platform,kind", [("model.onnx", "onnxruntime_onnx", "KIND_CPU"), ("model.plan", "tensorrt_plan", "KIND_GPU")]
)
def test_generated_config_parses_with_tritons_schema(tmp_path, filename, platform, kind):
    from tritonclient.grpc import model_config_pb2 as pb

    repository = _repository_with(tmp_path, filename)
    write_model_config(repository, ServingParameters(max_batch_size=128, preferred_batch_sizes=(8, 64, 256)))
    config = read_model_config(repository / MODEL_NAME)
    assert config.name == MODEL_NAME and config.platform == platform
    assert config.max_batch_size == 128
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == (INPUT_NAME, pb.TYPE_UINT8, [128, 128, 3])
    (out,) = config.output
    assert (out.name, out.data_type, list(out.dims)) == (OUTPUT_NAME, pb.TYPE_FP32, [2])
    assert out.label_filename == "labels.txt"
    assert (repository / MODEL_NAME / "labels.txt").read_text().split() == list(CLASSES)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 64]  # 256 > max batch dropped
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 10_000
    (group,) = config.instance_group
    assert pb.ModelInstanceGroup.Kind.Name(group.kind) == kind and group.count == 1
    assert config.version_policy.latest.num_versions == 1


def test_the_config_publishes_the_decision_rule(tmp_path):
    """A plain Triton client reads the threshold the batch job and the page use from the model's config."""
    from cells.decision import DECISION_FILE, Decision

    repository = _repository_with(tmp_path, "model.onnx")
    write_model_config(repository, ServingParameters())
    default = {k: v.string_value for k, v in read_model_config(repository / MODEL_NAME).parameters.items()}
    assert float(default["decision_threshold"]) == 0.5 and "not validated" in default["decision_validated_on"]
    labels, scores = np.array([1] * 1000 + [0] * 10), np.r_[np.linspace(0, 0.9, 1000), np.full(10, 0.95)]
    decision = Decision.from_validation(labels, scores, 0.8537, "30 validation fields of iml-smears")
    (repository / MODEL_NAME / DECISION_FILE).write_text(json.dumps(decision.to_json()))
    write_model_config(repository, ServingParameters())
    parameters = {k: v.string_value for k, v in read_model_config(repository / MODEL_NAME).parameters.items()}
    assert float(parameters["decision_threshold"]) == 0.8537
    assert CLASSES[int(parameters["decision_output_index"])] == parameters["decision_class"] == "Parasitized"
    assert parameters["decision_validated_on"] == (
        "chosen on 30 validation fields of iml-smears (1,000 uninfected and 10 infected cells)")
    assert float(parameters["decision_false_positive_rate"]) == pytest.approx(0.051, abs=0.002)
    assert decision.describe().startswith("p(parasitized) ≥ 0.854, chosen on 30 validation fields of iml-smears")


def test_config_refuses_an_empty_version(tmp_path):
    (tmp_path / MODEL_NAME / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no model.plan or model.onnx"):
        write_model_config(tmp_path, ServingParameters())


def test_engine_profile_and_trtexec_command():
    profile = EngineProfile(opt_batch=32, max_batch=128)
    assert profile.shapes()["image"] == {"min": (1, 128, 128, 3), "opt": (32, 128, 128, 3), "max": (128, 128, 128, 3)}
    command = trtexec_command(Path("m.onnx"), Path("r/1/model.plan"), profile, Path("t.cache"))
    assert command[:3] == ["trtexec", "--onnx=m.onnx", "--saveEngine=r/1/model.plan"]
    for flag in ("--minShapes=image:1x128x128x3", "--optShapes=image:32x128x128x3",
                 "--maxShapes=image:128x128x128x3", "--fp16", "--timingCacheFile=t.cache"):
        assert flag in command
    assert "--fp16" not in trtexec_command(Path("m"), Path("p"), EngineProfile(fp16=False))
    with pytest.raises(ValueError, match="opt"):
        EngineProfile(opt_batch=512, max_batch=256)


def test_parity_gate_numbers():
    reference = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    assert parity(reference, reference) == {"max_abs_diff": 0.0, "class_agreement": 1.0}
    assert check_gate(parity(reference, reference + 1e-5), None) == []
    (failure,) = check_gate(parity(reference, reference + 1e-3), None)
    assert "FP32" in failure
    flipped = reference[:, ::-1]
    assert any("FP16" in f for f in check_gate(parity(reference, reference), parity(reference, flipped)))


@pytest.mark.slow
def test_export_without_tensorrt_keeps_onnx_and_names_trtexec(exported):
    repository, _, result = exported
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("smearscope export: error")]
    assert len(error_lines) == 1 and "trtexec --onnx=" in error_lines[0] and "--fp16" in error_lines[0]
    assert "repository written" in result.stdout
    assert read_model_config(repository / MODEL_NAME).platform == "onnxruntime_onnx"
    assert not (repository / MODEL_NAME / "1" / "model.plan").exists()


@pytest.mark.slow
def test_round_trip_onnx_runtime_equals_keras(exported, cells_dir):
    import keras

    from cells.runtime import OnnxModel
    from train.data import list_samples, load_cells

    repository, model_file, _ = exported
    cells = load_cells(list_samples(cells_dir))
    expected = np.asarray(keras.models.load_model(model_file)(cells.images, training=False))
    fp32 = OnnxModel(model_file.parent / "export" / "model.fp32.onnx")(cells.images)
    assert np.max(np.abs(fp32 - expected)) <= 1e-4
    served = OnnxModel(repository / MODEL_NAME / "1" / "model.onnx")(cells.images)
    assert np.max(np.abs(served - expected)) <= 1e-2
    assert (served.argmax(1) == expected.argmax(1)).mean() >= 0.995
    report = json.loads((repository / MODEL_NAME / "export_report.json").read_text())
    assert report["gate_passed"] and report["served_onnx"] == "fp16"
    assert report["parity_images"] == len(cells.labels)
    assert report["sizes_bytes"]["onnx_fp16"] < 0.6 * report["sizes_bytes"]["onnx_fp32"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is None, reason="TensorRT is not installed here")
def test_build_tensorrt_engine(exported, tmp_path):
    from export.tensorrt import build_engine

    _, model_file, _ = exported
    metadata = build_engine(model_file.parent / "export" / "model.fp32.onnx", tmp_path / "1" / "model.plan", EngineProfile())
    assert (tmp_path / "1" / "model.plan").stat().st_size > 0 and metadata["fp16"]


def test_export_bad_inputs(tmp_path):
    missing = call_cli("export", "--model", str(tmp_path / "nope.keras"), "--repository", str(tmp_path / "r"))
    assert missing.returncode != 0 and "model not found" in missing.stderr
    bogus = tmp_path / "bogus.keras"
    bogus.write_text("not a model")
    invalid = call_cli("export", "--model", str(bogus), "--repository", str(tmp_path / "r"))
    assert invalid.returncode != 0 and "cannot load" in invalid.stderr and "Traceback" not in invalid.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = call_cli("export", "--model", str(bogus), "--repository", str(blocker / "repo"))
    assert unwritable.returncode != 0 and "not writable" in unwritable.stderr
    half = call_cli("export", "--model", str(bogus), "--repository", str(tmp_path / "r"), "--fields", str(bogus))
    assert half.returncode != 0 and "--fields and --field-images go together" in half.stderr
