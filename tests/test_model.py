import numpy as np
import pytest

from cells.contract import CLASSES, INPUT_NAME, OUTPUT_NAME
from train.model import EXPECTED_PARAMETERS, WeightsError, build_model


@pytest.fixture(scope="module")
def model():
    return build_model("none")


def test_parameter_count_matches_the_tutorial(model):
    assert model.count_params() == EXPECTED_PARAMETERS == 23_827_330


def test_uint8_in_probabilities_out(model, cells_dir):
    from train.data import list_samples, load_cells

    cells = load_cells(list_samples(cells_dir)[:6])
    assert model.inputs[0].dtype == "uint8" and model.input.name == INPUT_NAME
    assert model.output.name.startswith(OUTPUT_NAME) or model.layers[-1].name == OUTPUT_NAME
    out = np.asarray(model(cells.images, training=False))
    assert out.shape == (6, len(CLASSES))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_missing_local_weights_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_model(str(tmp_path / "absent.weights.h5"))
