"""Average the weights of fine-tunes of one parent checkpoint into one model (a "model soup").

Fine-tunes that start from the same weights stay in one basin of the loss, so their average is a
model of its own, often better than each of them, at the inference cost of one (Wortsman et al.,
"Model soups", ICML 2022). Batch-norm moving statistics are averaged like every other weight.

    smearscope soup --models A.keras B.keras C.keras --out runs/soup/model.keras
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cells.errors import BadInput


def average_weights(weight_lists: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Element-wise mean of several models' weight lists, in each weight's own dtype.

    Raises ValueError unless every model has the same weights in the same order and shapes:
    averaging different architectures (or a model with its own fine-tune's optimizer state) is
    meaningless.
    """
    if not weight_lists:
        raise BadInput("no models to average")
    first = weight_lists[0]
    for index, weights in enumerate(weight_lists[1:], start=1):
        shapes = [w.shape for w in weights]
        if shapes != [w.shape for w in first]:
            raise BadInput(f"model {index} does not have the weights of model 0 (different architecture)")
    return [
        np.mean([weights[i] for weights in weight_lists], axis=0).astype(first[i].dtype)
        for i in range(len(first))
    ]


def soup(model_paths: Sequence[Path], out: Path) -> Path:
    """Save the uniform soup of the .keras models at `model_paths` to `out`."""
    import keras

    models = [keras.models.load_model(path, compile=False) for path in model_paths]
    souped = models[0]
    souped.set_weights(average_weights([model.get_weights() for model in models]))
    out.parent.mkdir(parents=True, exist_ok=True)
    souped.save(out)
    return out
