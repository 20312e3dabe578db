"""`python -m export`: the same command as `smearscope export`."""
from cells.cli import standalone
from export.commands import configure_export

raise SystemExit(standalone("python -m export", "Keras -> ONNX (-> TensorRT) -> Triton model repository", configure_export))
