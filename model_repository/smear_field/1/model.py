"""smear_field in Triton's Python backend (the official container): BLS over the repository's models.

The same steps as `smearscope serve` (fields.pipeline.FieldPipeline), whose three models are here
BLS requests to the detector, the crop graph and the classifier, so each runs in its own backend:
TensorRT engines on a GPU host (deploy/gpu/build-engine.sh builds all three). Decode and the
detector's post-processing run in this process on the CPU; the crops never leave the server.
Needs the smearscope package in the container's Python (deploy/gpu/docker-compose.yml).
Written against the Python backend's documentation; not run here (no GPU, no container).
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from cells.contract import (
    CROPS_NAME, CROPS_OUTPUT, DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT, FIELD_INPUT, FIELD_OPTIONS, INPUT_NAME,
    MODEL_NAME, OUTPUT_NAME,
)
from fields.pipeline import FieldPipeline, FieldRequest


def _call(model: str, inputs: dict, output: str) -> np.ndarray:
    """One BLS request; its output as a host array, or the callee's error raised."""
    request = pb_utils.InferenceRequest(model_name=model, requested_output_names=[output],
                                        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()])
    response = request.exec()
    if response.has_error():
        raise pb_utils.TritonModelException(f"{model}: {response.error().message()}")
    tensor = pb_utils.get_output_tensor_by_name(response, output)
    return tensor.as_numpy() if tensor.is_cpu() else np.from_dlpack(tensor.to_dlpack())


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        threshold = float(config["parameters"]["decision_threshold"]["string_value"])
        self.pipeline = FieldPipeline(
            detector=lambda field: _call(DETECTOR_NAME, {DETECTOR_INPUT: field}, DETECTOR_OUTPUT),
            classifier=lambda crops: _call(MODEL_NAME, {INPUT_NAME: crops}, OUTPUT_NAME),
            crop_graph=lambda inputs: _call(CROPS_NAME, inputs, CROPS_OUTPUT),
            threshold=threshold, crops="graph")

    def execute(self, requests: list) -> list:
        fields = []
        for request in requests:
            options = {key: pb_utils.get_input_tensor_by_name(request, key) for key in FIELD_OPTIONS}
            data = pb_utils.get_input_tensor_by_name(request, FIELD_INPUT).as_numpy().reshape(-1)[0]
            fields.append(FieldRequest(bytes(data), **{key: tensor.as_numpy().reshape(-1)[0].item()
                                                       for key, tensor in options.items() if tensor is not None}))
        responses = []
        for cells in self.pipeline(fields):
            outputs = {"boxes": cells.boxes, "areas": cells.areas, "probabilities": cells.probabilities,
                       "calls": cells.calls, "counts": cells.counts, "size": np.array([cells.width, cells.height], np.int32),
                       "error": np.array([cells.error.encode()], dtype=np.object_)}
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(key, value[None]) for key, value in outputs.items()]))
        return responses
