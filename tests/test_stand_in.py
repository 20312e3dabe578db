"""The feed benchmark's stand-in models answer as the real ones' contracts say, at almost no cost."""
import numpy as np

from bench.stand_in import FIXED_PROBABILITIES, record_detector, stand_in_repository
from cells.contract import DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT, MODEL_NAME
from cells.repository import DEFAULT_REPOSITORY, read_model_config, served_onnx
from cells.runtime import OnnxModel
from tests.conftest import FIXTURES


def test_stand_ins_answer_the_recorded_maps_and_fixed_probabilities(tmp_path):
    fields = sorted((FIXTURES / "smears").glob("*.JPG"))
    repository = stand_in_repository(DEFAULT_REPOSITORY, fields, tmp_path / "repository")
    inputs, maps = record_detector(DEFAULT_REPOSITORY, fields)
    detector = OnnxModel(served_onnx(repository, DETECTOR_NAME), batch_size=1, input_name=DETECTOR_INPUT,
                         output_name=DETECTOR_OUTPUT)
    for index in (2, 0, 1):
        np.testing.assert_array_equal(detector(inputs[index][None])[0], maps[index])
    probabilities = OnnxModel(served_onnx(repository, MODEL_NAME))(np.zeros((5, 128, 128, 3), np.uint8))
    np.testing.assert_array_equal(probabilities, np.tile(np.float32(FIXED_PROBABILITIES), (5, 1)))
    for name in (MODEL_NAME, DETECTOR_NAME):  # the released configs: same contract, batching and decision rule
        assert read_model_config(repository / name) == read_model_config(DEFAULT_REPOSITORY / name)
