"""Adapting the classifier to a lab: training cells cut from annotated fields, the field split, the
import of the released ONNX model, the decision rule and a short real `smearscope adapt` run."""
import json
from collections import Counter

import numpy as np
import pytest

from cells.contract import MODEL_NAME, PARASITIZED, UNINFECTED
from cells.decision import DECISION_FILE, Decision, choose_threshold, read_decision, slide_call
from cells.detection_eval import AnnotatedBox, load_annotations, load_rgb
from cells.errors import BadInput
from cells.repository import DEFAULT_REPOSITORY, source_onnx
from tests.conftest import FIXTURES, call_cli
from train.fields import clip_box, cut_field, label_of, load_field_cells, split_fields

FIELDS = FIXTURES / "smears"
ANNOTATIONS = FIELDS / "annotations.json"


def test_annotated_types_map_to_labels_and_difficult_is_left_out():
    assert [label_of(kind) for kind in ("ring", "trophozoite", "schizont", "gametocyte")] == [PARASITIZED] * 4
    assert label_of("red blood cell") == UNINFECTED
    assert label_of("difficult") is None and label_of("white blood cell") is None


def test_boxes_at_and_beyond_the_border_are_clipped_or_dropped():
    assert clip_box((-10, 5, 40, 30), 100, 80) == (0, 5, 30, 30)
    assert clip_box((90, 70, 40, 30), 100, 80) == (90, 70, 10, 10)
    assert clip_box((99, 10, 40, 30), 100, 80) is None  # 1 px inside
    assert clip_box((120, 10, 40, 30), 100, 80) is None


def _found_cells(image):
    from fields.slides import find_classical

    return find_classical(image)


def test_a_field_s_cells_are_the_crops_the_batch_job_classifies():
    """Matched annotations take the found cell's crop (the batch job's), the rest are cut from their box."""
    from fields.slides import slide_cells

    name = "PA171772.JPG"
    image = load_rgb(FIELDS / name)
    annotated = list(load_annotations(ANNOTATIONS)[name])
    height, width = image.shape[:2]
    annotated += [AnnotatedBox((5, 5, 60, 60), "difficult"), AnnotatedBox((width - 30, 400, 70, 70), "ring"),
                  AnnotatedBox((width + 10, 10, 50, 50), "red blood cell")]
    crops, kinds, counts = cut_field(image, annotated, _found_cells, stain_normalise=False)
    labels = np.array([label_of(kind) for kind in kinds])
    cells = [a for a in annotated if a.type != "difficult"]
    assert counts["left out: difficult"] == 1 and counts["left out: outside the field"] == 1
    assert "difficult" not in kinds and len(crops) == len(labels) == len(cells) - 1 == counts["matched a found cell"] + counts["cut from the annotated box"]
    assert counts["matched a found cell"] > 0.8 * len(crops)
    assert Counter(labels.tolist())[PARASITIZED] == sum(label_of(a.type) == PARASITIZED for a in cells)
    assert crops.shape[1:] == (128, 128, 3) and crops.dtype == np.uint8
    assert labels[-1] == PARASITIZED and crops[-1].any()  # the cell cut by the right edge is kept, from its box
    batch_crops = {c.tobytes() for c in slide_cells(image, _found_cells(image), stain_normalise=False).crops}
    assert sum(c.tobytes() in batch_crops for c in crops) == counts["matched a found cell"]


def test_stain_normalised_cells_and_a_whole_folder_of_fields():
    cells = load_field_cells(ANNOTATIONS, FIELDS, _found_cells, stain_normalise=True)
    raw = load_field_cells(ANNOTATIONS, FIELDS, _found_cells, stain_normalise=False)
    assert sorted(set(cells.fields)) == sorted(p.name for p in FIELDS.glob("*.JPG"))
    assert (cells.labels == raw.labels).all() and not np.array_equal(cells.images, raw.images)
    one = cells.select({"PA171691.JPG"})
    assert set(one.fields) == {"PA171691.JPG"} and len(one.labels) == one.fields.count("PA171691.JPG")
    with pytest.raises(BadInput, match="no image"):
        load_field_cells(ANNOTATIONS, FIELDS / "missing", _found_cells, stain_normalise=False)


def test_the_split_is_by_field_and_stratified(tmp_path):
    entries = [{"image_name": f"f{i:02d}.jpg",
                "objects": [{"type": "ring" if i < 7 else "red blood cell", "bbox": {"x": "1", "y": "1", "w": "9", "h": "9"}}]}
               for i in range(20)]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(entries))
    train, val = split_fields(path, 0.3, seed=1)
    assert not train & val and train | val == {e["image_name"] for e in entries}
    assert len(val) == 6  # 30 % of the 7 with parasites (2) and of the 13 without (4)
    assert len([n for n in val if int(n[1:3]) < 7]) == 2
    assert split_fields(path, 0.3, seed=1) == (train, val) != split_fields(path, 0.3, seed=2)


def test_the_released_onnx_model_imports_into_keras_exactly():
    from cells.runtime import OnnxModel
    from train.data import list_samples, load_cells
    from train.from_onnx import keras_from_onnx

    source = source_onnx(DEFAULT_REPOSITORY, MODEL_NAME)
    cells = load_cells(list_samples(FIXTURES / "cells"))
    keras_p = keras_from_onnx(source).predict(cells.images, verbose=0)
    onnx_p = OnnxModel(source)(cells.images)
    assert np.abs(keras_p - onnx_p).max() < 1e-3  # the source is FP16
    with pytest.raises(ValueError, match="not a smearscope ResNet50V2"):
        keras_from_onnx(DEFAULT_REPOSITORY / "rbc_detector" / "1" / "model.onnx")


def test_the_threshold_is_the_lowest_within_the_false_positive_budget():
    labels = np.array([UNINFECTED] * 1000 + [PARASITIZED] * 10)
    scores = np.concatenate([np.linspace(0.0, 0.99, 1000), np.full(10, 0.995)])
    threshold = choose_threshold(labels, scores, 0.005)  # 5 of 1000 uninfected may pass
    uninfected = scores[:1000]
    assert (uninfected >= threshold).sum() == 5 and uninfected[-6] < threshold
    assert choose_threshold(labels, scores, 0.0) > uninfected.max()
    decision = Decision.from_validation(labels, scores, threshold, "test")
    rates = decision.rates()
    assert rates.false_positive_rate == 0.005 and rates.sensitivity == 1.0
    assert rates.false_positive_high == pytest.approx(0.01164, abs=1e-4)  # Wilson upper bound of 5/1000
    stricter = decision.with_threshold(0.999).rates()
    assert stricter.false_positive_rate == 0.0 and stricter.sensitivity == 0.0
    with pytest.raises(BadInput):
        decision.with_threshold(1.5)


def test_the_decision_is_stored_and_read_back(tmp_path):
    assert read_decision(tmp_path) == Decision()  # none stored: 0.5, nothing validated
    decision = Decision.from_validation(np.array([0, 1, 1]), np.array([0.9, 0.2, 0.6]), 0.7, "three cells")
    (tmp_path / DECISION_FILE).write_text(json.dumps(decision.to_json()))
    assert read_decision(tmp_path) == decision
    (tmp_path / DECISION_FILE).write_text(json.dumps({"threshold": 0.7, "nonsense": 1, "uninfected": [1, 2]}))
    with pytest.raises(BadInput, match="not a decision file"):
        read_decision(tmp_path)


def test_slide_calls_weigh_counts_against_the_false_positive_rate():
    labels = np.array([UNINFECTED] * 2000 + [PARASITIZED] * 50)
    scores = np.concatenate([np.r_[np.zeros(1996), np.full(4, 0.9)], np.full(45, 0.95), np.zeros(5)])
    decision = Decision.from_validation(labels, scores, 0.8, "test")  # 0.2 % false positives, 90 % sensitivity
    assert slide_call(1, 300, decision) == "uncertain"  # one unsure cell is not a positive slide
    assert slide_call(0, 300, decision) == "uncertain"  # too few cells to rule out infection
    assert slide_call(0, 10000, decision) == "negative"
    assert slide_call(40, 2000, decision) == "positive"  # 2 %: far above 0.2 % false positives
    assert slide_call(8, 2000, decision) == "uncertain"  # 0.4 %: false positives could explain it
    assert slide_call(0, 0, decision) == "uncertain"
    assert slide_call(1, 300, Decision()) == "positive"  # an unvalidated model's one cell is taken at its word


def test_the_threshold_labels_cells_and_decided_prefers_the_flag(tmp_path):
    from batch.field import FieldSettings, decided
    from batch.results import classified

    probabilities = np.array([[0.7, 0.3], [0.95, 0.05], [0.2, 0.8]], np.float32)
    boxes, areas = np.zeros((3, 4), np.int32), np.ones(3, np.int32)
    at_half = classified("f", "s", boxes, areas, probabilities, 10, 10, 0.0)
    at_high = classified("f", "s", boxes, areas, probabilities, 10, 10, 0.0, threshold=0.9)
    assert [r["label"] for r in at_half.cell_rows] == ["Parasitized", "Parasitized", "Uninfected"]
    assert [r["label"] for r in at_high.cell_rows] == ["Uninfected", "Parasitized", "Uninfected"]
    assert at_high.parasitized == 1
    model = tmp_path / MODEL_NAME
    model.mkdir()
    (model / DECISION_FILE).write_text(json.dumps(Decision(threshold=0.93).to_json()))
    assert decided(FieldSettings(), tmp_path, MODEL_NAME)[0].threshold == 0.93
    assert decided(FieldSettings(threshold=0.6), tmp_path, MODEL_NAME)[1].threshold == 0.6
    with pytest.raises(BadInput):
        FieldSettings(threshold=0.0)


@pytest.mark.slow
def test_adapt_runs_resumes_and_writes_its_threshold(tmp_path):
    """A real fine-tune of the released model on the fixture fields and cells, a few steps."""
    out = tmp_path / "adapt"
    common = ("adapt", "--data", str(FIXTURES / "cells"), "--fields", str(ANNOTATIONS), "--field-images", str(FIELDS),
              "--out", str(out), "--steps-per-epoch", "2", "--batch-size", "4", "--field-val-fraction", "0.4",
              "--finder", "classical", "--trainable-from", "conv5")
    first = call_cli(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "state.json").read_text())["epochs_done"] == 1
    again = call_cli(*common, "--epochs", "2", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch 1" in again.stdout
    assert json.loads((out / "state.json").read_text())["epochs_done"] == 2
    split = json.loads((out / "split.json").read_text())
    assert len(split["val_fields"]) == 1 and not set(split["train_fields"]) & set(split["val_fields"])
    decision = read_decision(out)
    report = json.loads((out / "evaluation.json").read_text())
    assert 0 < decision.threshold < 1 and report["threshold"] == decision.threshold
    assert decision.uninfected == report["after"]["lab"]["uninfected"] > 50
    assert report["after"]["lab"]["uninfected_called_parasitized"] <= 0.005
    assert {"nih", "lab"} <= set(report["after"]) and report["before_at_0.5"]["nih"]["images"] > 0
    assert (out / "model.keras").is_file()
    rows = (out / "val_predictions.csv").read_text().splitlines()
    assert rows[0] == "field,kind,p_parasitized" and len(rows) == 1 + decision.uninfected + decision.infected
    bad = call_cli("adapt", "--data", str(FIXTURES / "cells"), "--fields", str(ANNOTATIONS), "--field-images",
                  str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 1 and "no image of" in bad.stderr and "Traceback" not in bad.stderr


def test_export_carries_the_run_s_decision_and_drops_a_stale_one(tmp_path):
    from export.pipeline import copy_decision

    run, model_dir = tmp_path / "run", tmp_path / "repo" / MODEL_NAME
    run.mkdir()
    model_dir.mkdir(parents=True)
    (model_dir / DECISION_FILE).write_text(json.dumps(Decision(threshold=0.9).to_json()))
    assert copy_decision(run, model_dir) is None and not (model_dir / DECISION_FILE).exists()
    (run / DECISION_FILE).write_text(json.dumps(Decision(threshold=0.97).to_json()))
    assert copy_decision(run, model_dir) == 0.97 and read_decision(model_dir).threshold == 0.97
