"""Keras -> ONNX with the contract's names and a dynamic batch, and the FP16 variant."""
from __future__ import annotations

from pathlib import Path

from cells.contract import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME

OPSET = 17


def keras_to_onnx(model, path: Path, input_name: str = INPUT_NAME, input_shape: tuple = INPUT_SHAPE,
                  output_name: str = OUTPUT_NAME) -> Path:
    """Convert with tf2onnx, a dynamic batch and the contract's names: by default the classifier's,
    uint8 `image` [-1,128,128,3] in, FP32 `probabilities` out."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, *input_shape), tf.uint8, name=input_name),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    _name_single_output(proto, output_name)
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _name_single_output(proto, name: str) -> None:
    """tf2onnx names outputs after the layer, with suffixes that vary; pin the contract's name."""
    (output,) = proto.graph.output
    old = output.name
    if old == name:
        return
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    output.name = name


def to_fp16(source: Path, target: Path) -> Path:
    """FP16 weights and compute, I/O kept as uint8 in and FP32 out so clients do not change."""
    import warnings

    import onnx
    from onnxconverter_common import float16

    # Cast stays FP32: the converter would retype the uint8->float Cast's output without its `to`.
    blocked = [*float16.DEFAULT_OP_BLOCK_LIST, "Cast"]
    with warnings.catch_warnings():  # one warning per weight clipped to FP16's range: counted in parity instead
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, op_block_list=blocked)
    onnx.save(model, str(target))
    return target
