"""The learned red-cell detector: its targets, its maps to cells, training, export, serving beside
the classifier, and the batch job finding cells with it through Triton."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from batch.field import FieldSettings
from cells.contract import DETECTOR_NAME, DETECTOR_SCALE, MODEL_NAME
from cells.detect import cells_from_maps, detector_input
from cells.detection_eval import AnnotatedBox, load_annotations, load_rgb, score_field
from cells.errors import BadInput
from cells.repository import DEFAULT_REPOSITORY, read_model_config
from deploy.client import CLASSIFIER, DETECTOR, check_contract
from export.triton_config import DETECTOR_SERVING, build_config
from tests.conftest import FIXTURES, call_cli, shared_run

FIELDS = FIXTURES / "smears"
ANNOTATIONS = FIELDS / "annotations.json"
# The released detector on the three fixture fields (border rule), where the classical finder
# scores F1 0.971. These fields were among its training fields, so this is a floor against
# breakage, not a measure of quality: the cross-validated numbers are in docs/detection.md.
FIXTURE_F1_FLOOR = 0.95


def _blob_maps(centres: list[tuple[int, int]], radius: float, shape=(60, 80)) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    maps = np.zeros((*shape, 2), np.float32)
    for row, col in centres:
        distance = np.hypot(rows - row, cols - col)
        maps[..., 0] = np.maximum(maps[..., 0], (distance <= radius).astype(np.float32))
        maps[..., 1] = np.maximum(maps[..., 1], np.exp(-(distance**2) / (2 * (0.4 * radius) ** 2)))
    return maps


def test_maps_become_one_full_resolution_cell_per_centre():
    radius = 70 / DETECTOR_SCALE / 2  # a typical cell at the detector's scale
    maps = _blob_maps([(20, 20), (20, 37), (45, 60)], radius)  # two touching, one alone
    cells = cells_from_maps(maps, (240, 320), DETECTOR_SCALE, keep_border=True)
    assert len(cells) == 3
    for cell, (row, col) in zip(sorted(cells, key=lambda c: (c.y, c.x)), [(20, 20), (20, 37), (45, 60)]):
        assert abs(cell.x + cell.w / 2 - DETECTOR_SCALE * (col + 0.5)) <= 6
        assert abs(cell.y + cell.h / 2 - DETECTOR_SCALE * (row + 0.5)) <= 6
        assert 60 <= cell.w <= 100 and cell.mask.shape == (cell.h, cell.w) and cell.mask.any()
    assert cells_from_maps(np.zeros((60, 80, 2), np.float32), (240, 320), DETECTOR_SCALE) == []


def test_targets_teach_boxes_and_ignore_unannotated_cells():
    from train.detector import targets

    annotated = [AnnotatedBox((40, 40, 80, 80), "red blood cell"), AnnotatedBox((200, 40, 80, 80), "difficult")]
    found = [(40, 40, 80, 80), (200, 40, 80, 80), (40, 160, 80, 80)]  # the third: a cell nobody boxed
    maps = targets(annotated, found, (60, 80))
    cell, centre, weight = maps[..., 0], maps[..., 1], maps[..., 2]
    assert cell[20, 20] == 1 and centre[20, 20] == pytest.approx(1, abs=0.05)  # the box's centre, at 1/4
    assert cell[50, 70] == 0 and weight[50, 70] == 1  # empty background is taught as background
    assert weight[20, 60] == 0 and weight[50, 20] == 0  # the difficult one and the unboxed one: ignored
    assert weight[20, 20] == 1


def test_fields_of_another_scale_are_rescaled_and_bad_scales_refused():
    image = load_rgb(sorted(FIELDS.glob("*.JPG"))[0])
    small, factor = detector_input(image)
    assert small.shape == (240, 320, 3) and factor == DETECTOR_SCALE
    half = image[::2, ::2]  # the same field at half the magnification: cells 35 px across
    small_half, factor_half = detector_input(half, cell_diameter=35)
    assert small_half.shape == (240, 320, 3) and factor_half == pytest.approx(DETECTOR_SCALE / 2)
    odd, _ = detector_input(image[:1000, :777])
    assert odd.shape[0] % 16 == 0 and odd.shape[1] % 16 == 0
    with pytest.raises(BadInput, match="cell diameter"):
        FieldSettings(cell_diameter=5000)
    with pytest.raises(BadInput, match="finder"):
        FieldSettings(finder="magic")


def test_the_detector_contract_and_its_generated_config():
    config = build_config(DETECTOR_SERVING, "onnxruntime_onnx")
    assert config.name == DETECTOR_NAME and config.max_batch_size == 8
    assert list(config.input[0].dims) == [-1, -1, 3] and list(config.output[0].dims) == [-1, -1, 2]
    committed = read_model_config(DEFAULT_REPOSITORY / DETECTOR_NAME)
    assert committed == config  # the released repository's config is the generated one
    assert (DEFAULT_REPOSITORY / DETECTOR_NAME / "1" / "model.onnx").stat().st_size < 10 * 2**20


@pytest.mark.slow
def test_train_resume_and_export_a_detector(tmp_path):
    common = ["train-detector", "--fields", str(FIELDS), "--annotations", str(ANNOTATIONS), "--folds", "0",
              "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "64", "--out", str(tmp_path / "run")]
    first = call_cli(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = call_cli(*common, "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = json.loads((tmp_path / "run" / "all" / "state.json").read_text())
    assert [entry["epoch"] for entry in state["history"]] == [1, 2]  # epoch 1 not redone
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["all_fields_training_score"]["fields"] == 3
    repository = tmp_path / "repo"
    exported = call_cli("export-detector", "--model", str(tmp_path / "run" / "all" / "model.keras"),
                       "--repository", str(repository))
    assert exported.returncode == 0, exported.stderr[-2000:]
    written = json.loads((repository / DETECTOR_NAME / "export_report.json").read_text())
    assert written["gate_passed"] and written["max_abs_diff"]["fp32"] <= 1e-4
    assert read_model_config(repository / DETECTOR_NAME) == build_config(DETECTOR_SERVING, "onnxruntime_onnx")


@pytest.mark.slow
def test_both_models_in_one_triton_and_the_batch_job_finds_cells_with_the_detector(released_server, ray_cluster, tmp_path):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(released_server.grpc_url)
    check_contract(client.get_model_metadata(MODEL_NAME, as_json=True), MODEL_NAME, CLASSIFIER)
    check_contract(client.get_model_metadata(DETECTOR_NAME, as_json=True), DETECTOR_NAME, DETECTOR)
    client.close()
    results = {}
    for finder in ("learned", "classical"):
        output = tmp_path / finder
        run = shared_run(ray_cluster, released_server, "--input", str(FIELDS), "--output", str(output), "--finder", finder,
                         "--keep-border-cells")
        assert run.returncode == 0, run.stderr[-2000:]
        results[finder] = output
    annotations = load_annotations(ANNOTATIONS)
    for finder, output in results.items():
        report = json.loads((output / "run.json").read_text())
        assert report["finder"] == finder and report["fields_ok"] == 3
        cells = pq.read_table(output / "cells.parquet").to_pylist()
        total = None
        for path in sorted(FIELDS.glob("*.JPG")):
            boxes = [(c["x"], c["y"], c["w"], c["h"]) for c in cells if c["field"].endswith(path.name)]
            match = score_field(boxes, annotations[path.name], 1280, 960)
            total = match if total is None else total + match
        if finder == "learned":
            assert total.f1 >= FIXTURE_F1_FLOOR, total


@pytest.mark.parametrize("seed", range(40))
def test_label_peaks_are_skimages_peaks_in_the_same_order(seed):
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    from cells.detect import label_peaks

    rng = np.random.default_rng(seed)
    image = ndi.gaussian_filter(rng.random((60, 70)), rng.uniform(0.5, 3)).astype(np.float32)
    if seed % 4 == 0:
        image = np.round(image * 20) / 20  # plateaus: flat regions and ties
    labels = ndi.label(rng.random((60, 70)) > rng.uniform(0.2, 0.7))[0]
    distance, threshold = int(rng.integers(1, 8)), float(np.quantile(image, 0.3))
    expected = peak_local_max(image, min_distance=distance, threshold_abs=threshold, labels=labels)
    assert np.array_equal(label_peaks(image, labels, distance, threshold), expected)


def test_label_peaks_on_detector_maps_of_a_real_field():
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    from cells.contract import DETECTOR_INPUT, DETECTOR_OUTPUT
    from cells.detect import label_peaks
    from cells.repository import served_onnx
    from cells.runtime import OnnxModel

    model = OnnxModel(served_onnx(DEFAULT_REPOSITORY, DETECTOR_NAME), batch_size=1, threads=1,
                      input_name=DETECTOR_INPUT, output_name=DETECTOR_OUTPUT)
    small, _ = detector_input(load_rgb(FIELDS / "PA171691.JPG"))
    maps = model(small[None])[0]
    labels = ndi.label((maps[..., 0] > 0.85) | (maps[..., 1] > 0.3))[0]
    expected = peak_local_max(maps[..., 1], min_distance=5, threshold_abs=0.3, labels=labels)
    assert len(expected) > 50
    assert np.array_equal(label_peaks(maps[..., 1], labels, 5, 0.3), expected)
