"""The per-pixel half of a field as an ONNX graph: cut, mask, resize and stain-normalise every cell.

The graph computes what `cells.find.cell_crops` and `cells.stain.normalise_stain` compute in NumPy
and PIL, so that a served field model runs it in its runtime (ONNX Runtime or OpenVINO on a CPU,
TensorRT on a GPU) and the host only does bookkeeping. It uses only operators TensorRT 10's ONNX
parser imports (`export/tensorrt_onnx_ops.txt`, checked by a test).

- **Cut and mask**: each cell's padded square (`cells.crop.crop_windows`) is gathered from the
  field, black outside the field and outside the cell: a pixel is the cell's when the detector's
  label map (at 1/`factor`) holds the cell's label there, the mask `cells.detect` cuts too.
- **Resize**: PIL's bilinear resize, exactly: the weights of its triangle filter (support widened
  by the scale when shrinking, i.e. antialiased; plain bilinear when enlarging) as matrices, one
  pass along x rounded to uint8 as PIL rounds between passes, then one along y. Two batched MatMuls.
  ONNX `Resize` and `RoiAlign` cannot mask before interpolating, and TensorRT's `Resize` has no
  antialiasing; `GridSample` could mask but interpolates from 4 taps only (no antialiasing).
- **Stain**: Reinhard's transfer in CIELAB (skimage's D65 formulas), the field's mean and spread
  over all its crops' cell pixels, applied to those pixels only; fields of fewer than MIN_CELLS
  cells left unchanged.

On a CPU the graph costs more than the NumPy/PIL functions it reproduces (docs/performance.md):
those use the stain's ~0.1 M distinct colours a field, the graph converts every pixel, which a GPU does in microseconds.

Inputs: `field` uint8 [H, W, 3]; `labels` int32 [h, w]; `windows` int32 [N, 4] (left, top, side,
label) in the field's px; `factor` float32 [1], field px per label px; `normalise` bool [1], False
to skip the stain step. Output: `crops` uint8 [N, 128, 128, 3].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cells.contract import CROPS_INPUTS, CROPS_OUTPUT, IMAGE_SIZE
from cells.stain import BACKGROUND_LEVEL, MIN_CELLS, REFERENCE

OPSET = 17
# skimage.color: sRGB (D65) to XYZ, and the D65 white point.
RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                       [0.212671, 0.715160, 0.072169],
                       [0.019334, 0.119193, 0.950227]])
WHITE = np.array([0.95047, 1.0, 1.08883])
# CIELAB from f(X), f(Y), f(Z): L = 116 fy - 16, a = 500 (fx - fy), b = 200 (fy - fz).
F_TO_LAB = np.array([[0.0, 500.0, 0.0], [116.0, -500.0, 200.0], [0.0, 0.0, -200.0]])
LAB_OFFSET = np.array([-16.0, 0.0, 0.0])


class _Builder:
    """Nodes and constants of one graph, each output named after its node."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.constants: list = []

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        from onnx import helper

        name = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attributes))
        return name

    def const(self, value, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = f"const_{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


def _srgb_to_linear_table() -> np.ndarray:
    """Linear light of each of the 256 sRGB levels (skimage's gamma expansion)."""
    c = np.arange(256) / 255.0
    return np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)


def _cut_and_resize(g: _Builder) -> str:
    """Crops as colour planes [3, N, 128, 128] (floats holding uint8 levels) from the field, the
    labels and the windows. Planes keep every per-channel step a broadcast over contiguous pixels."""
    f32, i64 = 1, 7  # onnx.TensorProto.FLOAT, INT64
    field = g.op("Cast", "field", to=f32)  # TensorRT takes UINT8 only as a network input or output
    shape = g.op("Shape", field)
    height, width = g.op("Slice", shape, g.const([0], np.int64), g.const([1], np.int64)), \
        g.op("Slice", shape, g.const([1], np.int64), g.const([2], np.int64))
    planes = g.op("Reshape", g.op("Transpose", field, perm=[2, 0, 1]), g.const([3, -1], np.int64))  # [3, H*W]
    label_shape = g.op("Shape", "labels")
    label_rows = g.op("Slice", label_shape, g.const([0], np.int64), g.const([1], np.int64))
    label_cols = g.op("Slice", label_shape, g.const([1], np.int64), g.const([2], np.int64))
    flat_labels = g.op("Reshape", "labels", g.const([-1], np.int64))

    windows = g.op("Cast", "windows", to=i64)
    left, top, side, label = (g.op("Slice", windows, g.const([k], np.int64), g.const([k + 1], np.int64),
                                   g.const([1], np.int64)) for k in range(4))  # each [N, 1]
    largest = g.op("ReduceMax", side, keepdims=0)  # S: every cell's square fits in S x S
    steps = g.op("Range", g.const(0, np.int64), g.op("Reshape", largest, g.const([], np.int64)), g.const(1, np.int64))
    steps = g.op("Unsqueeze", steps, g.const([0], np.int64))  # [1, S]
    in_square = g.op("Less", steps, side)  # [N, S]

    def axis(start: str, size: str, label_size: str) -> tuple[str, str, str]:
        """Clamped field index, label-map index and validity of each of a square's rows (or columns)."""
        position = g.op("Add", start, steps)  # [N, S]
        valid = g.op("And", in_square, g.op("And", g.op("GreaterOrEqual", position, g.const(0, np.int64)),
                                            g.op("Less", position, size)))
        clamped = g.op("Min", g.op("Max", position, g.const(0, np.int64)), g.op("Sub", size, g.const(1, np.int64)))
        # The label pixel a field pixel falls in: floor((y + 0.5) / factor), y // factor for an integer factor.
        centre = g.op("Div", g.op("Add", g.op("Cast", clamped, to=f32), g.const(0.5)), "factor")
        in_labels = g.op("Min", g.op("Cast", g.op("Floor", centre), to=i64), g.op("Sub", label_size, g.const(1, np.int64)))
        return clamped, in_labels, valid

    rows, label_row, row_ok = axis(top, height, label_rows)
    cols, label_col, col_ok = axis(left, width, label_cols)
    unsq = lambda x, axes: g.op("Unsqueeze", x, g.const(axes, np.int64))  # noqa: E731
    pixel = g.op("Add", g.op("Mul", unsq(rows, [2]), width), unsq(cols, [1]))  # [N, S, S]
    label_pixel = g.op("Add", g.op("Mul", unsq(label_row, [2]), label_cols), unsq(label_col, [1]))
    own = g.op("Equal", g.op("Cast", g.op("Gather", flat_labels, label_pixel, axis=0), to=i64), unsq(label, [2]))
    keep = g.op("And", own, g.op("And", unsq(row_ok, [2]), unsq(col_ok, [1])))
    squares = g.op("Mul", g.op("Gather", planes, pixel, axis=1), g.op("Cast", keep, to=f32))  # [3, N, S(y), S(x)]

    # PIL's bilinear weights from a square of `side` px to IMAGE_SIZE: out px o, in px i.
    side_f = g.op("Cast", side, to=f32)  # [N, 1]
    scale = g.op("Div", side_f, g.const(float(IMAGE_SIZE)))
    support = g.op("Max", scale, g.const(1.0))
    centres = g.op("Mul", g.const((np.arange(IMAGE_SIZE) + 0.5)[None, :]), scale)  # [N, 128]
    taps = g.op("Add", g.op("Cast", steps, to=f32), g.const(0.5))  # [1, S]
    distance = g.op("Div", g.op("Abs", g.op("Sub", unsq(taps, [1]), unsq(centres, [2]))), unsq(support, [2]))
    weights = g.op("Mul", g.op("Relu", g.op("Sub", g.const(1.0), distance)), unsq(g.op("Cast", in_square, to=f32), [1]))
    weights = g.op("Div", weights, g.op("ReduceSum", weights, g.const([2], np.int64), keepdims=1))  # [N, 128, S]

    along_x = _round_levels(g, g.op("MatMul", squares, g.op("Transpose", weights, perm=[0, 2, 1])))  # [3, N, S, 128]
    return _round_levels(g, g.op("MatMul", weights, along_x))  # [3, N, 128, 128]


def _round_levels(g: _Builder, values: str) -> str:
    """Rounded to the nearest uint8 level, as PIL stores each resampling pass."""
    return g.op("Clip", g.op("Floor", g.op("Add", values, g.const(0.5))), g.const(0.0), g.const(255.0))


def _where_above(g: _Builder, values: str, level: float, above: str, below: str) -> str:
    return g.op("Where", g.op("Greater", values, g.const(level)), above, below)


def _power(g: _Builder, values: str, exponent: float) -> str:
    """values ** exponent for values > 0 (others: the power of a tiny number), as Exp and Log."""
    return g.op("Exp", g.op("Mul", g.op("Log", g.op("Max", values, g.const(1e-12))), g.const(exponent)))


def _normalise_stain(g: _Builder, planes: str) -> str:
    """The crops [3, N, 128, 128] with their cell pixels recoloured to the reference stain (cells.stain):
    CIELAB from sRGB, the field's mean and spread over its cell pixels, each channel shifted and
    scaled to the reference's, back to sRGB (skimage's formulas throughout)."""
    f32 = 1
    shape = g.op("Shape", planes)
    rgb = g.op("Reshape", planes, g.const([3, -1], np.int64))  # [3, P]
    cell = g.op("Greater", g.op("ReduceMax", rgb, axes=[0], keepdims=1), g.const(float(BACKGROUND_LEVEL)))  # [1, P]
    weight = g.op("Cast", cell, to=f32)
    column = lambda values: g.const(np.asarray(values, np.float64)[:, None])  # noqa: E731 - a per-channel constant [3, 1]

    linear = g.op("Gather", g.const(_srgb_to_linear_table()), g.op("Cast", rgb, to=6), axis=0)
    xyz = g.op("MatMul", g.const(RGB_TO_XYZ / WHITE[:, None]), linear)  # white-relative X, Y, Z
    f = _where_above(g, xyz, 0.008856, _power(g, xyz, 1 / 3), g.op("Add", g.op("Mul", xyz, g.const(7.787)),
                                                                         g.const(16.0 / 116.0)))
    lab = g.op("Add", g.op("MatMul", g.const(F_TO_LAB.T), f), column(LAB_OFFSET))

    count = g.op("ReduceSum", weight, g.const([0, 1], np.int64), keepdims=0)  # [1]
    total = g.op("Max", count, g.const(1.0))
    mean = g.op("Div", g.op("MatMul", lab, g.op("Transpose", weight)), total)  # [3, 1]
    centred = g.op("Sub", lab, mean)
    variance = g.op("Div", g.op("MatMul", g.op("Mul", centred, centred), g.op("Transpose", weight)), total)
    gain = g.op("Div", column(REFERENCE.std), g.op("Max", g.op("Sqrt", variance), g.const(1e-3)))
    # Back to f(X), f(Y), f(Z) from the recoloured CIELAB: one 3x3 matrix and offset for the whole field.
    to_f = g.const(np.linalg.inv(F_TO_LAB.T))
    f = g.op("Add", g.op("MatMul", to_f, g.op("Add", g.op("Mul", centred, gain), column(REFERENCE.mean))),
             column(-np.linalg.inv(F_TO_LAB.T) @ LAB_OFFSET))
    f = g.op("Max", f, column([-np.inf, -np.inf, 0.0]))  # skimage clips a negative z to 0
    xyz = _where_above(g, f, 0.2068966, g.op("Mul", f, g.op("Mul", f, f)),
                       g.op("Div", g.op("Sub", f, g.const(16.0 / 116.0)), g.const(7.787)))
    linear = g.op("MatMul", g.const(np.linalg.inv(RGB_TO_XYZ / WHITE[:, None])), xyz)
    srgb = _where_above(g, linear, 0.0031308, g.op("Sub", g.op("Mul", _power(g, linear, 1 / 2.4), g.const(1.055)),
                                                   g.const(0.055)), g.op("Mul", linear, g.const(12.92)))
    recoloured = g.op("Round", g.op("Mul", g.op("Clip", srgb, g.const(0.0), g.const(1.0)), g.const(255.0)))

    cells = g.op("Slice", shape, g.const([1], np.int64), g.const([2], np.int64))
    enough = g.op("And", g.op("And", g.op("GreaterOrEqual", cells, g.const([MIN_CELLS], np.int64)),
                              g.op("Greater", count, g.const(0.0))), "normalise")
    return g.op("Reshape", g.op("Where", g.op("And", cell, enough), recoloured, rgb), shape)


def build_crop_graph(path: Path) -> Path:
    """Write the crop graph (module docstring) to `path`."""
    import onnx
    from onnx import TensorProto, helper

    g = _Builder()
    crops = g.op("Transpose", _normalise_stain(g, _cut_and_resize(g)), perm=[1, 2, 3, 0])  # [N, 128, 128, 3]
    g.nodes.append(helper.make_node("Cast", [crops], [CROPS_OUTPUT], to=TensorProto.UINT8))
    field, labels, windows, factor, normalise = CROPS_INPUTS
    graph = helper.make_graph(
        g.nodes, "cell_crops",
        [helper.make_tensor_value_info(field, TensorProto.UINT8, ["H", "W", 3]),
         helper.make_tensor_value_info(labels, TensorProto.INT32, ["h", "w"]),
         helper.make_tensor_value_info(windows, TensorProto.INT32, ["N", 4]),
         helper.make_tensor_value_info(factor, TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info(normalise, TensorProto.BOOL, [1])],
        [helper.make_tensor_value_info(CROPS_OUTPUT, TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE, 3])],
        initializer=g.constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
