"""Weight averaging of fine-tunes: the soup is the element-wise mean, batch-norm statistics included."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from smearscope.cli import main
from train.soup import average_weights


def small_model(seed: int, width: int = 8) -> keras.Model:
    """Dense + batch norm with non-trivial moving statistics, so every kind of weight is averaged."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = keras.layers.BatchNormalization(momentum=0.0)(keras.layers.Dense(width)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(hidden))
    model.compile("adam", "sparse_categorical_crossentropy")
    data = np.random.default_rng(seed).normal(seed, 1 + seed, (64, 4)).astype("float32")
    model.fit(data, np.arange(64) % 2, epochs=1, verbose=0)
    return model


def test_soup_file_holds_the_mean_of_every_weight(tmp_path):
    models = [small_model(seed) for seed in (1, 2, 3)]
    paths = []
    for index, model in enumerate(models):
        paths.append(tmp_path / f"m{index}.keras")
        model.save(paths[-1])

    assert main(["soup", "--models", *map(str, paths), "--out", str(tmp_path / "soup" / "model.keras")]) == 0

    souped = keras.models.load_model(tmp_path / "soup" / "model.keras", compile=False)
    moving_means = [w for w in souped.weights if "moving_mean" in w.path]
    assert len(moving_means) == 1 and np.abs(keras.ops.convert_to_numpy(moving_means[0].value)).max() > 0.1
    for position, weight in enumerate(souped.get_weights()):
        expected = np.mean([model.get_weights()[position] for model in models], axis=0)
        assert np.allclose(weight, expected, atol=1e-6)
    assert not np.allclose(souped.get_weights()[0], models[0].get_weights()[0])


def test_models_of_different_architectures_are_refused():
    with pytest.raises(ValueError, match="different architecture"):
        average_weights([small_model(1).get_weights(), small_model(2, width=16).get_weights()])


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["soup", "--models", str(tmp_path / "absent.keras"), "--out", str(tmp_path / "soup.keras")]) == 1
    assert "model not found" in capsys.readouterr().err
