"""A released classifier's ONNX file back into the Keras model, so it can be fine-tuned.

The repository keeps the FP16 ONNX graph (`source/model.onnx`), not a .keras file. tf2onnx folded
every batch norm into its neighbour: a BN after a convolution into that convolution's weights and
bias, a pre-activation BN into a Mul and an Add. Each is loaded back as the same function: the
folded convolution into the convolution, and every BN as the identity statistics (mean 0,
variance 1 - eps) with the folded scale and shift as gamma and beta. The rebuilt model's BNs must
stay in inference mode (they are frozen by `train.adapt`), which is how a fine-tune treats them
anyway. Verified against ONNX Runtime in the tests (max |diff| at FP16 precision).
"""
from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np

from train.model import build_model

LAYER = re.compile(r"/((?:conv\d_block\d+_(?:\d|preact)|conv1|post)_(?:conv|bn))_\d+/")
DENSE = ("dense_128", "probabilities")


def _layer_name(tensor_names: list[str]) -> str | None:
    for name in tensor_names:
        found = LAYER.search(name)
        if found:
            return found.group(1)
    return None


def _layer(container: keras.Model, name: str | None, path: Path) -> keras.layers.Layer:
    try:
        return container.get_layer(name)
    except ValueError as error:
        raise ValueError(f"{path}: not a smearscope ResNet50V2 classifier (no layer for {name!r})") from error


def _set_bn(layer: keras.layers.BatchNormalization, scale: np.ndarray, shift: np.ndarray) -> None:
    variance = np.full_like(scale, 1.0 - layer.epsilon)
    layer.set_weights([scale, shift, np.zeros_like(scale), variance])


def keras_from_onnx(path: Path) -> keras.Model:
    """The Keras classifier holding the weights of a ResNet50V2 classifier exported by `smearscope export`."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
    model = build_model("none")
    backbone = model.get_layer("resnet50v2")
    loaded: set[str] = set()
    dense_done = 0
    for node in graph.node:
        if node.op_type == "Conv":
            name = _layer_name([node.input[1], node.name])
            weight, bias = constants[node.input[1]], constants[node.input[2]]
            conv = _layer(backbone, name, path)
            kernel = weight.transpose(2, 3, 1, 0)
            if conv.use_bias:
                conv.set_weights([kernel, bias])
            else:
                conv.set_weights([kernel])
                bn = _layer(backbone, name.replace("_conv", "_bn"), path)
                _set_bn(bn, np.ones_like(bias), bias)
                loaded.add(bn.name)
            loaded.add(name)
        elif node.op_type == "Mul" and "_bn_" in node.name:
            name = _layer_name([node.name])
            add = next(n for n in graph.node if node.output[0] in n.input and n.op_type == "Add")
            scale = constants[node.input[1]].reshape(-1)
            shift = constants[next(i for i in add.input if i in constants)].reshape(-1)
            _set_bn(_layer(backbone, name, path), scale, shift)
            loaded.add(name)
        elif node.op_type == "MatMul":
            if dense_done == len(DENSE):
                raise ValueError(f"{path}: not a smearscope ResNet50V2 classifier (more than {len(DENSE)} dense layers)")
            add = next(n for n in graph.node if node.output[0] in n.input and n.op_type == "Add")
            bias = constants[next(i for i in add.input if i in constants)].reshape(-1)
            _layer(model, DENSE[dense_done], path).set_weights([constants[node.input[1]], bias])
            dense_done += 1
    weighted = {layer.name for layer in backbone.layers if layer.weights}
    missing = weighted - loaded
    if missing or dense_done != len(DENSE):
        raise ValueError(f"{path}: not a smearscope ResNet50V2 classifier (unmatched: {sorted(missing)[:5]})")
    return model


def load_model(path: Path) -> keras.Model:
    """A classifier to train or average: a .keras file, or an exported .onnx loaded back into Keras."""
    if path.suffix == ".onnx":
        return keras_from_onnx(path)
    return keras.models.load_model(path, compile=False)
