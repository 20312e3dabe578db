"""Export stage: Keras -> ONNX (tf2onnx) -> FP16 -> TensorRT plan, into a Triton model repository."""
