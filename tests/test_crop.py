import numpy as np
import pytest
from PIL import Image

from cells.contract import IMAGE_SIZE
from cells.crop import crop_cell
from tests.conftest import FIXTURES


def _check(crop: np.ndarray) -> None:
    assert crop.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert crop.dtype == np.uint8


def test_square_rgb_fills_the_frame():
    crop = crop_cell(Image.new("RGB", (64, 64), (200, 100, 50)))
    _check(crop)
    assert (crop == (200, 100, 50)).all()


def test_wide_image_keeps_aspect_and_pads_black():
    crop = crop_cell(Image.new("RGB", (400, 100), (255, 255, 255)))
    _check(crop)
    rows_with_content = np.flatnonzero(crop.max(axis=(1, 2)) > 0)
    assert len(rows_with_content) == 32  # 100/400 of 128 rows
    assert rows_with_content[0] == 48  # centred vertically
    assert (crop[:48] == 0).all() and (crop[80:] == 0).all()


def test_very_wide_and_tiny_images():
    _check(crop_cell(Image.new("RGB", (1000, 3), (9, 9, 9))))
    tiny = crop_cell(Image.new("RGB", (1, 1), (250, 10, 10)))
    _check(tiny)
    assert (tiny == (250, 10, 10)).all()


def test_grayscale_becomes_three_equal_channels():
    crop = crop_cell(Image.new("L", (50, 70), 123))
    _check(crop)
    centre = crop[64, 64]
    assert centre[0] == centre[1] == centre[2] == 123


def test_rgba_transparency_becomes_black():
    image = Image.new("RGBA", (60, 60), (255, 0, 0, 255))
    image.putpixel((0, 0), (255, 255, 255, 0))
    crop = crop_cell(image)
    _check(crop)
    assert tuple(crop[0, 0]) == (0, 0, 0)
    assert tuple(crop[64, 64]) == (255, 0, 0)


def test_sixteen_bit_grayscale_is_scaled():
    array = np.full((40, 40), 4000, dtype=np.uint16)
    crop = crop_cell(Image.fromarray(array))
    _check(crop)
    assert crop[64, 64, 0] == 255


def test_numpy_input_and_empty_image():
    _check(crop_cell(np.zeros((10, 20, 3), np.uint8)))
    with pytest.raises(ValueError, match="empty"):
        crop_cell(Image.new("RGB", (0, 5)))


def test_real_fixture_cells(cells_dir):
    for path in sorted(cells_dir.rglob("*.png"))[:5]:
        with Image.open(path) as image:
            _check(crop_cell(image))


def _reference_cut(field: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray) -> np.ndarray:
    """A cell cut the plain way (each step its own image), as the crops were made before they
    were written in place: the fast path must give the same bytes."""
    x, y, w, h = box
    side = max(w, h)
    side += 2 * max(2, round(0.05 * side))
    left, top = x + w // 2 - side // 2, y + h // 2 - side // 2
    padded = np.pad(field, ((side, side), (side, side), (0, 0)))
    square = padded[top + side : top + 2 * side, left + side : left + 2 * side].copy()
    keep = np.zeros((side, side), dtype=bool)
    keep[y - top : y - top + h, x - left : x - left + w] = mask
    square[~keep] = 0
    scale = IMAGE_SIZE / side
    new = max(1, round(side * scale))
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    canvas.paste(Image.fromarray(square).resize((new, new), Image.Resampling.BILINEAR),
                 ((IMAGE_SIZE - new) // 2, (IMAGE_SIZE - new) // 2))
    return np.asarray(canvas)


def test_field_crops_are_the_plain_per_cell_crops():
    from cells.detection_eval import load_rgb
    from cells.find import mask_box, cell_crops, find_cells

    field = load_rgb(FIXTURES / "smears" / "PA171691.JPG")
    cells = find_cells(field, keep_border=True)
    assert any(cell.touches_border for cell in cells), "the premise: some cells run off the field"
    crops = cell_crops(field, cells)
    assert np.array_equal(crops, np.stack([_reference_cut(field, *mask_box(cell)) for cell in cells]))
