"""The classifier: the reference tutorial's ResNet50V2 head, taking uint8 RGB and scaling inside."""
from __future__ import annotations

from pathlib import Path

import keras

from cells.contract import CLASSES, INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME
from cells.errors import UserError

# The tutorial architecture at 128x128x3; asserted by the tests.
EXPECTED_PARAMETERS = 23_827_330


class WeightsError(UserError, RuntimeError):
    """ImageNet weights could not be fetched, or a weights file is unusable."""


def build_model(weights: str = "none", dropout: float = 0.5) -> keras.Model:
    """ResNet50V2 (no top) -> AvgPool 4 -> Flatten -> Dense 128 ReLU -> Dropout -> Dense 2 softmax.

    `weights` is "none" (from scratch), "imagenet" (Keras' download/cache) or a path to a weights
    file for this whole model (.weights.h5) or a saved .keras model to start from. The Rescaling
    layer makes the model own its preprocessing, so the exported graph takes raw uint8 crops.
    """
    inputs = keras.Input(shape=INPUT_SHAPE, dtype="uint8", name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0 / 255, name="scale_to_unit")(inputs)
    try:
        backbone = keras.applications.ResNet50V2(
            include_top=False, weights="imagenet" if weights == "imagenet" else None, input_shape=INPUT_SHAPE
        )
    except Exception as error:  # noqa: BLE001 - Keras raises a bare Exception on a failed fetch
        raise WeightsError(
            f"could not fetch ImageNet weights ({str(error).splitlines()[0][:120]}); use --weights none, "
            "a local file (--weights PATH), or put the Keras cache file in ~/.keras/models/"
        ) from error
    x = backbone(x)
    x = keras.layers.AveragePooling2D(pool_size=(4, 4), name="avg_pool_4")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name="dense_128")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", name=OUTPUT_NAME, dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="malaria_resnet50v2")
    if weights not in ("none", "imagenet"):
        _load_local_weights(model, Path(weights))
    return model


def _load_local_weights(model: keras.Model, path: Path) -> None:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".keras":
        source = keras.models.load_model(path, compile=False)
        model.set_weights(source.get_weights())
    else:
        model.load_weights(path)
