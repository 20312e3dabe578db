"""Average the weights of fine-tunes of one parent checkpoint into one model (a "model soup").

Fine-tunes that start from the same weights stay in one basin of the loss, so their average is a
model of its own, often better than each of them, at the inference cost of one (Wortsman et al.,
"Model soups", ICML 2022). Batch-norm moving statistics are averaged like every other weight.

    smearscope soup --models A.keras B.keras C.keras --out runs/soup/model.keras
    smearscope soup --models parent.onnx fine-tune.keras --mix 0.5 0.5 --out runs/wise/model.keras
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cells.errors import BadInput


def average_weights(weight_lists: Sequence[Sequence[np.ndarray]], mix: Sequence[float] | None = None) -> list[np.ndarray]:
    """Element-wise mean of several models' weight lists (weighted by `mix`, default equal), in each
    weight's own dtype.

    Raises ValueError unless every model has the same weights in the same order and shapes:
    averaging different architectures (or a model with its own fine-tune's optimizer state) is
    meaningless.
    """
    if not weight_lists:
        raise BadInput("no models to average")
    if mix is not None and (len(mix) != len(weight_lists) or min(mix) < 0 or sum(mix) <= 0):
        raise BadInput(f"--mix needs one non-negative weight per model ({len(weight_lists)}), not {list(mix)}")
    first = weight_lists[0]
    for index, weights in enumerate(weight_lists[1:], start=1):
        shapes = [w.shape for w in weights]
        if shapes != [w.shape for w in first]:
            raise BadInput(f"model {index} does not have the weights of model 0 (different architecture)")
    return [
        np.average([weights[i] for weights in weight_lists], axis=0, weights=mix).astype(first[i].dtype)
        for i in range(len(first))
    ]


def soup(model_paths: Sequence[Path], out: Path, mix: Sequence[float] | None = None) -> Path:
    """Save the soup of the models at `model_paths` (.keras, or an exported classifier .onnx) to `out`.

    A fine-tune mixed with the model it started from (`--mix`) is WiSE-FT (Wortsman et al.,
    "Robust fine-tuning of zero-shot models", CVPR 2022): the mix trades what the fine-tune
    gained on the new data against what the parent knew, at the inference cost of one model.
    """
    from train.from_onnx import load_model

    models = [load_model(Path(path)) for path in model_paths]
    souped = models[0]
    souped.set_weights(average_weights([model.get_weights() for model in models], mix))
    out.parent.mkdir(parents=True, exist_ok=True)
    souped.save(out)
    return out
