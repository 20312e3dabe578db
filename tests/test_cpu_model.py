"""The INT8 CPU models of the released classifier (ONNX Runtime's QDQ, OpenVINO's NNCF): exact upcast,
gates that pass them and refuse broken ones, and the runtime each CPU gets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from cells.contract import MODEL_NAME
from cells.repository import read_model_config
from cells.runtime import OnnxModel
from export.cpu_model import gate_cells, int8_models, upcast_to_fp32
from export.pipeline import ExportError, quantize_repository
from tests.conftest import CELLS, run_cli

pytestmark = pytest.mark.slow
RELEASED = Path(__file__).resolve().parents[1] / "model_repository" / MODEL_NAME
FP16 = RELEASED / "source" / "model.onnx"


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    return upcast_to_fp32(FP16, tmp_path_factory.mktemp("fp32") / "model.fp32.onnx")


@pytest.fixture(scope="module")
def cells():
    return gate_cells(CELLS, None)


def fp16_repository(root: Path) -> Path:
    """The released repository as `smearscope export --no-int8` leaves it: the FP16 model served."""
    model = root / MODEL_NAME
    (model / "1").mkdir(parents=True)
    shutil.copyfile(FP16, model / "1" / "model.onnx")
    for name in ("config.pbtxt", "labels.txt", "export_report.json"):
        shutil.copyfile(RELEASED / name, model / name)
    return root


def test_upcast_keeps_every_weight_and_the_answers(fp32, cells):
    initializers = onnx.load(str(fp32)).graph.initializer
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in initializers)
    _, validation = cells
    half, full = OnnxModel(FP16)(validation.images), OnnxModel(fp32)(validation.images)
    assert np.max(np.abs(half - full)) < 1e-2 and (half.argmax(1) == full.argmax(1)).all()


def test_quantize_serves_a_gated_int8_and_keeps_the_fp16_for_engines(tmp_path):
    repository = fp16_repository(tmp_path / "repo")
    result = run_cli("quantize", "--repository", str(repository), "--data", str(CELLS), "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr[-2000:]
    model = repository / MODEL_NAME
    served, source = model / "1" / "model.onnx", model / "source" / "model.onnx"
    assert source.read_bytes() == FP16.read_bytes()
    assert served.stat().st_size < 0.6 * source.stat().st_size
    nodes = onnx.load(str(served)).graph.node
    assert any(node.op_type == "QuantizeLinear" for node in nodes)
    (softmax,) = [node for node in nodes if node.op_type == "Softmax"]
    assert not any(node.op_type == "QuantizeLinear" and softmax.output[0] in node.input for node in nodes)  # FP32 p
    report = json.loads((model / "export_report.json").read_text())
    for gate in (report["int8_vs_fp32"], report["openvino_int8_vs_fp32"]):
        assert gate["validation_images"] == 48 and gate["accuracy_drop_points"] <= 0.5
    openvino = model / "1" / "model.xml"
    assert openvino.is_file() and openvino.with_suffix(".bin").stat().st_size < 0.6 * source.stat().st_size
    config = text_format.Parse((model / "configs" / "openvino.pbtxt").read_text(), pb.ModelConfig())
    served_config = read_model_config(model)
    assert (config.backend, config.default_model_filename, config.platform) == ("openvino", "model.xml", "")
    assert (config.input, config.output, config.parameters["decision_threshold"]) == (
        served_config.input, served_config.output, served_config.parameters["decision_threshold"])


def test_a_broken_calibration_is_refused_and_the_repository_left_as_it_was(tmp_path, fp32, cells, monkeypatch):
    calibration, validation = cells
    dark = calibration // 16  # activation ranges far too narrow for real cells
    models, reports, failures = int8_models(fp32, tmp_path, dark, validation)
    assert [failure.split(" accuracy")[0] for failure in failures] == ["onnxruntime INT8", "openvino INT8"]
    assert all("points below FP32" in failure for failure in failures)
    assert all(report["int8_accuracy"] < report["fp32_accuracy"] for report in reports.values())

    repository = fp16_repository(tmp_path / "repo")
    before = {p: p.read_bytes() for p in repository.rglob("*") if p.is_file()}
    monkeypatch.setattr("export.pipeline.gate_cells", lambda data, split: (dark, validation))
    # The export path gets the same calibration's models and gates, quantised once above.
    monkeypatch.setattr("export.pipeline.int8_models", lambda *_: (models, reports, failures))
    with pytest.raises(ExportError, match="INT8 gate failed, repository unchanged"):
        quantize_repository(repository, MODEL_NAME, CELLS, None, tmp_path / "work")
    assert {p: p.read_bytes() for p in repository.rglob("*") if p.is_file()} == before


def test_the_runtime_is_chosen_by_the_cpus_kind_and_the_models_form(tmp_path):
    from cells.contract import DETECTOR_NAME
    from cells.repository import DEFAULT_REPOSITORY
    from cells.runtime import MEASURED_FASTER, choose_runtime, cpu_kind, model_form

    amx = {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}
    vnni = {"avx2", "avx512_vnni"}
    assert (cpu_kind(amx), cpu_kind(vnni), cpu_kind({"avx2"})) == ("amx", "avx512-vnni", "avx2")
    assert (model_form(DEFAULT_REPOSITORY, MODEL_NAME), model_form(DEFAULT_REPOSITORY, DETECTOR_NAME)) == (
        "openvino-int8", "fp32")
    qdq_only = tmp_path / MODEL_NAME / "1"
    qdq_only.mkdir(parents=True)
    shutil.copyfile(RELEASED / "1" / "model.onnx", qdq_only / "model.onnx")
    assert model_form(tmp_path, MODEL_NAME) == "int8"
    for flags, kind in ((amx, "amx"), (vnni, "avx512-vnni")):
        for repository, name in ((DEFAULT_REPOSITORY, MODEL_NAME), (DEFAULT_REPOSITORY, DETECTOR_NAME), (tmp_path, MODEL_NAME)):
            expected = MEASURED_FASTER.get((kind, model_form(repository, name)), "onnxruntime")
            assert choose_runtime(repository, name, flags=flags) == expected
    assert choose_runtime(DEFAULT_REPOSITORY, DETECTOR_NAME, flags=amx) == "openvino"  # 105 vs 31 fields/s on an AMX Xeon
    assert choose_runtime(tmp_path, MODEL_NAME, flags=amx) == "onnxruntime"  # OpenVINO was slower on the QDQ ONNX
    assert choose_runtime(DEFAULT_REPOSITORY, MODEL_NAME, flags={"avx2"}) == "onnxruntime"  # not measured
    assert choose_runtime(DEFAULT_REPOSITORY, DETECTOR_NAME, "onnxruntime", flags=amx) == "onnxruntime"  # asked for


def test_the_served_decision_gate_refuses_a_drift_at_the_threshold():
    """Probabilities shifted down by 0.05 move the infected cells near the served threshold: refused;
    the same probabilities pass; one infected cell is always allowed where a point is less than a cell."""
    from export.cpu_model import gate_decision

    labels = np.array([0] * 20 + [1] * 980)  # 20 infected (Parasitized = 0), 980 uninfected
    p = np.concatenate([np.linspace(0.80, 0.99, 20), np.linspace(0.0, 0.9, 980)])
    fp32 = np.stack([p, 1 - p], axis=1)
    report, failures = gate_decision(fp32, fp32, labels, 0.85, "same")
    assert not failures and report["calls_differing"] == 0
    shifted = np.stack([p - 0.05, 1 - p + 0.05], axis=1)
    report, failures = gate_decision(fp32, shifted, labels, 0.85, "shifted")
    assert report["int8_infected_called_parasitized"] < report["fp32_infected_called_parasitized"] - 0.05
    assert any("infected cells Parasitized" in f for f in failures)
    one_cell = fp32.copy()
    one_cell[np.flatnonzero(p >= 0.85)[0], 0] = 0.5  # one infected cell of 20 (5 points) no longer called
    assert not gate_decision(fp32, one_cell, labels, 0.85, "one cell")[1]


def test_a_drifting_decision_is_refused_and_the_repository_left_as_it_was(tmp_path, fp32, cells, monkeypatch):
    """quantize with a lab's fields: the served-decision gate runs on the lab's cells (the fixture
    fields, cut by the released detector) and its refusal leaves the repository unchanged."""
    from export.cpu_model import gate_decision

    calibration, validation = cells
    repository = fp16_repository(tmp_path / "repo")
    before = {p: p.read_bytes() for p in repository.rglob("*") if p.is_file()}
    seen = {}

    def drifting(fp32_path, work, calibration, validation, lab, threshold):  # the quantisation itself is tested above
        seen["lab"], seen["threshold"] = lab, threshold
        answers = OnnxModel(fp32_path)(lab.images)
        shifted = np.clip(answers - np.array([0.3, -0.3], np.float32), 0, 1)  # a calibration that shifts p down
        report, failures = gate_decision(answers, shifted, lab.labels, threshold, "onnxruntime INT8")
        return {}, {"onnxruntime": {"served_decision": report}}, failures

    monkeypatch.setattr("export.pipeline.gate_cells", lambda data, split: (calibration, validation))
    monkeypatch.setattr("export.pipeline.int8_models", drifting)
    smears = Path(__file__).parent / "fixtures" / "smears"
    with pytest.raises(ExportError, match="INT8 gate failed, repository unchanged: onnxruntime INT8 calls"):
        quantize_repository(repository, MODEL_NAME, CELLS, None, tmp_path / "work",
                            (smears / "annotations.json", smears))
    assert len(seen["lab"].labels) > 300 and (seen["lab"].labels == 0).any()  # the three fields' annotated cells
    assert seen["threshold"] == pytest.approx(0.5)  # this repository publishes no decision.json: the default
    assert {p: p.read_bytes() for p in repository.rglob("*") if p.is_file()} == before


def test_autos_choice_of_runtime_never_moves_a_fixture_fields_count_beyond_the_tolerance(fp32):
    """Whatever runtime `auto` picks on each kind of CPU, the released classifier's file it serves calls
    each annotated fixture field's cells (cut by the released detector, as the job cuts them) at the
    published threshold within one cell of FP32's count: the gate's allowance where a field has fewer
    than 50 infected cells. The three fields' 11 infected cells are too few to tell the old QDQ's drift
    (one cell in one field) from this one; the served-decision gate on the lab's validation fields is
    what tells them apart (docs/operating-point.md)."""
    from cells.contract import PARASITIZED
    from cells.decision import read_decision
    from cells.repository import DEFAULT_REPOSITORY, runtime_model
    from cells.runtime import RUNTIMES, choose_runtime
    from export.pipeline import lab_validation_cells

    smears = Path(__file__).parent / "fixtures" / "smears"
    lab = lab_validation_cells(DEFAULT_REPOSITORY, smears / "annotations.json", smears, None)
    threshold = read_decision(RELEASED).threshold
    fields = np.array(lab.fields)

    def counts(p_parasitized: np.ndarray) -> np.ndarray:
        return np.array([(p_parasitized[fields == name] >= threshold).sum() for name in sorted(set(lab.fields))])

    reference = OnnxModel(fp32)(lab.images)[:, PARASITIZED]
    assert counts(reference).sum() >= 5  # fields with parasites called at the threshold
    kinds = {"amx": {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, "avx512-vnni": {"avx2", "avx512_vnni"},
             "avx2": {"avx2"}}
    chosen = {kind: choose_runtime(DEFAULT_REPOSITORY, MODEL_NAME, flags=flags) for kind, flags in kinds.items()}
    assert set(chosen.values()) == {"onnxruntime", "openvino"}  # two different INT8 files are served
    for kind, runtime in chosen.items():
        served = RUNTIMES[runtime](runtime_model(DEFAULT_REPOSITORY, MODEL_NAME, runtime))(lab.images)[:, PARASITIZED]
        assert np.abs(served - reference).max() > 1e-3  # INT8 arithmetic, not FP32's answers
        moved = np.abs(counts(served) - counts(reference))
        assert moved.max() <= 1, f"{kind} ({runtime}) moves the fields' Parasitized counts by {moved.tolist()}"
