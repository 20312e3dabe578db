"""The one crop function: any cell image to the model's 128x128 RGB uint8 input.

Training data loading and the batch job both call `crop_cell`, so a cell looks the same to the
model whether it came from the NIH folders or from a whole smear field.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from cells.contract import IMAGE_SIZE

# One interpolation everywhere; PIL's bilinear filter antialiases when it shrinks.
RESAMPLE = Image.Resampling.BILINEAR


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparent pixels become black, like the NIH crop background."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray((array * (255.0 / peak)).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def crop_cell(image: Image.Image | np.ndarray, size: int = IMAGE_SIZE, out: np.ndarray | None = None) -> np.ndarray:
    """Fit a cell image into a size x size square: aspect kept, centred, padded with black.

    Returns uint8 [size, size, 3], written into `out` when given (it must be zeros, as from
    `np.zeros`, so that the padding is black). Raises ValueError on an empty image.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    rgb = to_rgb(image)
    width, height = rgb.size
    if width == 0 or height == 0:
        raise ValueError(f"empty image ({width}x{height})")
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(rgb.resize((new_w, new_h), RESAMPLE))
    out = np.zeros((size, size, 3), dtype=np.uint8) if out is None else out
    left, top = (size - new_w) // 2, (size - new_h) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def crop_windows(boxes: np.ndarray, pad_fraction: float = 0.05) -> np.ndarray:
    """The square `cut_cell` cuts around each box (x, y, w, h) [N, 4]: (left, top, side) [N, 3] int32,
    its side the box's longer side padded by `pad_fraction` of it (at least 2 px) on each side."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    x, y, w, h = boxes.T
    side = np.maximum(w, h)
    # np.round rounds half to even, as Python's round() does.
    side = side + 2 * np.maximum(2, np.round(pad_fraction * side).astype(np.int64))
    return np.stack([x + w // 2 - side // 2, y + h // 2 - side // 2, side], axis=1).astype(np.int32)


def cut_cell(
    field: np.ndarray,
    box: tuple[int, int, int, int],
    mask: np.ndarray | None = None,
    pad_fraction: float = 0.05,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One cell of a whole smear field, as the model sees NIH cells: alone on black, 128x128.

    The square around the box (padded by `pad_fraction` of its side; black outside the field) is cut,
    pixels outside the cell's `mask` (bool [h, w], aligned with the box) are blacked out, because the
    NIH training crops show one segmented cell on black; then `crop_cell` resizes it (into `out`).
    """
    x, y, w, h = box
    left, top, side = (int(v) for v in crop_windows(np.array([box]), pad_fraction)[0])
    square = np.zeros((side, side, 3), dtype=np.uint8)
    src_x0, src_y0 = max(left, 0), max(top, 0)
    src_x1, src_y1 = min(left + side, field.shape[1]), min(top + side, field.shape[0])
    if mask is not None:
        keep = np.zeros((side, side), dtype=np.uint8)
        keep[y - top : y - top + h, x - left : x - left + w] = mask
        keep = np.repeat(keep, 3, axis=1).reshape(side, side, 3)  # a multiply broadcast over 3 is ~10x slower
    if src_x1 > src_x0 and src_y1 > src_y0:
        inside = (slice(src_y0 - top, src_y1 - top), slice(src_x0 - left, src_x1 - left))
        window = field[src_y0:src_y1, src_x0:src_x1]
        if mask is None:
            square[inside] = window
        else:
            np.multiply(window, keep[inside], out=square[inside])
    return crop_cell(square, out=out)
