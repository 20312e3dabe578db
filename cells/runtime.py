"""ONNX Runtime on CPU for the repository's models: evaluation, export parity and the embedded server share it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cells.contract import CLASSES, INPUT_NAME, OUTPUT_NAME


def predict_in_batches(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    """Bounded memory for any number of crops; an empty input gives an empty [0,2] result."""
    parts = [np.asarray(predict(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, len(CLASSES)), np.float32)


class OnnxModel:
    """One input, one output, in chunks of `batch_size`: by default the classifier's contract,
    uint8 crops [N,128,128,3] in, probabilities [N,2] out."""

    def __init__(self, path: Path, batch_size: int = 64, threads: int = 0, input_name: str = INPUT_NAME,
                 output_name: str = OUTPUT_NAME) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Spinning threads steal the cores that decoding and other servers need on small machines.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.batch_size, self.input_name, self.output_name = batch_size, input_name, output_name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return predict_in_batches(self._run, images, self.batch_size)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]
