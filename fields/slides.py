"""Per-slide CPU work, run in Ray workers: decode safely, find cells, cut crops."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cells.crop import crop_cell, to_rgb


# Modes a smear photograph can honestly come in (16-bit grayscale too; Pillow reads 48-bit RGB as
# RGB); anything else (float, 1-bit) is refused.
SUPPORTED_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I"}
DEFAULT_MAX_PIXELS = 50_000_000  # ~40x a 1280x960 field; larger is a decompression bomb or not a field
# An image no larger than this a side is one cell crop (NIH crops are 50-400 px), classified whole.
CELL_IMAGE_MAX_SIDE = 400
CELL_IMAGE_MIN_SIDE = 16  # smaller is neither a field nor a cell


class SlideError(ValueError):
    """This image cannot be processed; the reason becomes the slide's error row."""


class NotAnImage(SlideError):
    """The bytes are no image format we read, or an image mode a camera does not write."""


class ImageTooLarge(SlideError):
    """More pixels than the limit: refused before decoding (a decompression bomb, or not a field)."""


def error_from_message(message: str) -> SlideError:
    """The error of `decode`'s kind (too large, not an image, other) that gave this message: a served
    field model answers the message only, the page answers each kind with its own HTTP status."""
    if message.startswith("image too large"):
        return ImageTooLarge(message)
    if message.startswith(("not an image", "unsupported image mode")):
        return NotAnImage(message)
    return SlideError(message)


@dataclass
class SlideCells:
    """What a worker sends back: one record per cell and the crops in the same order."""

    width: int
    height: int
    boxes: np.ndarray  # int32 [N, 4]: x, y, w, h
    areas: np.ndarray  # int32 [N]
    crops: np.ndarray  # uint8 [N, 128, 128, 3]
    image: np.ndarray | None = field(default=None, repr=False)  # kept only for overlays


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 array of an encoded image, or SlideError with a one-line reason."""
    if not data:
        raise SlideError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                pixels = image.width * image.height
                if pixels > max_pixels:
                    raise ImageTooLarge(f"image too large: {image.width}x{image.height} = {pixels:,} pixels > {max_pixels:,}")
                if image.mode not in SUPPORTED_MODES:
                    raise NotAnImage(f"unsupported image mode {image.mode}")
                image.load()
                return np.asarray(to_rgb(image))
    except SlideError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(f"image too large: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise NotAnImage("not an image (unrecognised format)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise SlideError(f"corrupt or truncated image: {str(error).splitlines()[0][:160]}") from error


def decode_field(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`decode`, refusing images too small to be a field or a cell."""
    image = decode(data, max_pixels)
    height, width = image.shape[:2]
    if error := too_small(width, height):
        raise error
    return image


def too_small(width: int, height: int) -> SlideError | None:
    """The error of an image too small to be a field or a cell, or None."""
    if min(height, width) < CELL_IMAGE_MIN_SIDE:
        return SlideError(f"image too small ({width}x{height}): neither a smear field nor a cell crop")
    return None


def is_cell_image(image: np.ndarray) -> bool:
    """An image of at most CELL_IMAGE_MAX_SIDE a side is one cell crop, as in the NIH set."""
    return max(image.shape[:2]) <= CELL_IMAGE_MAX_SIDE


def slide_cells(image: np.ndarray, found: list | None, keep_image: bool = False, stain_normalise: bool = True) -> SlideCells:
    """The found cells' crops, cut with the shared crop function and (by default) recoloured to the
    training data's stain (`cells.stain`); `found` None: the whole image is one cell, fitted by
    `crop_cell` as in training."""
    from cells.find import cell_crops  # scikit-image: imported by workers only
    from cells.stain import normalise_stain

    height, width = image.shape[:2]
    if found is None:
        boxes, areas, crops = [[0, 0, width, height]], [width * height], crop_cell(image)[None]
    else:
        boxes, areas = [[c.x, c.y, c.w, c.h] for c in found], [c.area for c in found]
        crops = cell_crops(image, found)
    if stain_normalise:
        crops = normalise_stain(crops)
    return SlideCells(
        width=width,
        height=height,
        boxes=np.array(boxes, dtype=np.int32).reshape(-1, 4),
        areas=np.array(areas, dtype=np.int32),
        crops=crops,
        image=image if keep_image else None,
    )


def find_classical(image: np.ndarray, keep_border: bool = False, cell_diameter: float | None = None) -> list:
    """The classical finder (`cells.find`), at the given typical cell diameter in px."""
    from cells.find import FindParams, find_cells

    params = FindParams() if cell_diameter is None else FindParams(cell_diameter=cell_diameter)
    return find_cells(image, params, keep_border=keep_border)


def prepare(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_image: bool = False,
    keep_border: bool = False,
    stain_normalise: bool = True,
) -> SlideCells:
    """Decode, find red cells with the classical finder and cut their crops, in one call."""
    image = decode_field(data, max_pixels)
    found = None if is_cell_image(image) else find_classical(image, keep_border)
    return slide_cells(image, found, keep_image, stain_normalise)
