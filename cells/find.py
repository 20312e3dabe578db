"""Find red blood cells in a whole Giemsa thin-smear field, classically (no learned model).

The pipeline, on a field downsampled 2x (cells stay ~35 px across, plenty for their outline):

1. Green channel: Giemsa-stained cells absorb green and the background does not, so it has the
   best cell/background contrast of the three in both well-stained and pale fields. The scale bar
   (black in every channel, which no stain is) is painted over with its surroundings first.
2. Two thresholds placed between this field's background and cell levels (Otsu splits the two
   classes; their medians set the scale). A strict one, 65% of the way to the cells, keeps the
   pale seams between touching cells open; a lenient one, halfway, also holds pale cells, which in
   P. vivax are often the infected ones.
3. Pale cell centres are filled, but not the background enclosed between touching cells: a
   centre is ringed by one cell's rim, a gap by whole cells (see `_fill_pale_centres`).
4. Seams, lines of background a pixel or two wide between cells pressed together, are cut out of
   the strict mask (a white top-hat, see `_seams`): the blur and the threshold close them, and a
   pair joined along a seam has no saddle in its distance transform to split at.
5. Cell centres are peaks of the distance transform of the strict mask, spaced at least 0.3 cell
   diameters apart; a watershed on the distance transform splits touching cells along its
   saddles. A peak of the lenient mask whose disc is mostly outside the strict mask is a pale cell
   and gets its own region from the lenient mask.
6. Regions smaller than 0.6 of the median cell of the field are fragments or debris: dropped.
7. Boxes are drawn 6 px (0.09 cell) outside the mask, as annotators draw them; crops are still
   framed on the mask (`cell_crops`), so model inputs do not change with that convention.

On the 100 IML fields: F1 0.937 (`smearscope evaluate-detection`); what the errors are, and the
splitters and filters that were measured and lost, are in docs/detection.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.measure import regionprops
from skimage.segmentation import watershed

from cells.contract import DETECTOR_CELL_DIAMETER, IMAGE_SIZE
from cells.crop import cut_cell


@dataclass(frozen=True)
class FindParams:
    """Tunables, with defaults measured on the 100 IML P. vivax fields (cells/detection_eval.py).

    Lengths are relative to `cell_diameter`, areas to the field's median cell, and threshold
    levels run from the field's background (0) to its median cell pixel (1), so the defaults
    carry over to other magnifications and stains.
    """

    scale: int = 2  # segment at 1/scale resolution
    smooth_sigma: float = 1.0  # Gaussian blur before thresholding, px at 1/scale (JPEG noise)
    cell_diameter: float = DETECTOR_CELL_DIAMETER  # typical cell, px at full resolution (IML boxes: 82 px)
    strict_level: float = 0.65  # threshold for cells and for splitting them
    seam_level: float = 0.3  # a thin line this much paler than its surroundings is a seam
    seam_width: float = 0.15  # widest seam, x cell_diameter
    pale_level: float = 0.5  # threshold for pale cells
    pale_fraction: float = 0.7  # a lenient peak is a pale cell if at most this much is strict
    max_centre_area: float = 0.5  # largest pale centre, x the area of a typical cell
    max_rim: float = 0.9  # thickest rim around a pale centre, x the radius of a typical cell
    peak_distance: float = 0.3  # closest two cell centres, x cell_diameter
    min_peak: float = 0.15  # shallowest cell centre (distance to background), x cell_diameter
    min_area: float = 0.6  # smallest cell, x the median cell area of the field
    overlay_level: int = 70  # darker than this in every channel: an overlay, not stain
    border_margin: int = 2  # px; a mask this close to an edge touches the border
    box_margin: float = 0.09  # box drawn this far outside the mask, x cell_diameter (IML: 6 px)


DEFAULTS = FindParams()


@dataclass(frozen=True)
class Cell:
    """One found cell: its box (full-resolution px, x and y top-left) and its mask in that box.

    The box has the annotators' margin around the mask (`FindParams.box_margin`).
    """

    x: int
    y: int
    w: int
    h: int
    area: int  # mask pixel count
    touches_border: bool  # mask within border_margin of the field edge: likely a partial cell
    mask: np.ndarray = field(repr=False, compare=False)  # bool [h, w]

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h


def find_cells(
    image: np.ndarray, params: FindParams = DEFAULTS, keep_border: bool = False
) -> list[Cell]:
    """Red cells (infected ones included) in an H x W x 3 uint8 RGB field, in label order.

    Cells touching the field border are dropped unless `keep_border`: they are partial, so a poor
    classifier input, and annotators often skip them. Raises ValueError unless the image is
    H x W x 3 uint8.
    """
    _check_rgb(image)
    if min(image.shape[:2]) < params.scale:
        return []
    strict, lenient = _masks(image, params)
    labels = _segment(strict, lenient, params)
    regions = regionprops(labels)
    if not regions:
        return []
    typical = float(np.median([region.area for region in regions]))
    cells = [
        region_to_cell(region, image.shape[:2], params)
        for region in regions
        if region.area >= params.min_area * typical
    ]
    return [cell for cell in cells if keep_border or not cell.touches_border]


def cell_crops(image: np.ndarray, cells: list[Cell]) -> np.ndarray:
    """Model inputs [N, 128, 128, 3] uint8: each cell alone on black, as in the NIH training crops.

    `cells.crop.cut_cell` cuts the padded square around each box (black outside the field) and
    blacks out pixels outside the cell's mask, neighbouring cells included.
    """
    _check_rgb(image)
    crops = np.zeros((len(cells), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for cell, crop in zip(cells, crops):
        cut_cell(image, *mask_box(cell), out=crop)
    return crops


def mask_box(cell: Cell) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The box hugging the cell's mask, and the mask cut to it.

    Crops are framed on the cell itself, as the NIH training crops are, not on the looser box
    that matches the annotators' convention.
    """
    rows, cols = np.flatnonzero(cell.mask.any(axis=1)), np.flatnonzero(cell.mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = (cell.x + int(c0), cell.y + int(r0), int(c1 - c0), int(r1 - r0))
    return box, cell.mask[r0:r1, c0:c1]


def _check_rgb(image: np.ndarray) -> None:
    """Reject anything but H x W x 3 uint8 early, with a message that names the problem.

    Grayscale has no green channel to threshold, and the levels assume 0-255 values.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image, got dtype {image.dtype}")


def _downsample(channel: np.ndarray, scale: int) -> np.ndarray:
    """Block mean: cheap, and averages out JPEG noise at the same time."""
    height, width = (channel.shape[0] // scale) * scale, (channel.shape[1] // scale) * scale
    blocks = channel[:height, :width].reshape(height // scale, scale, width // scale, scale)
    return blocks.mean(axis=(1, 3))


def _radius(params: FindParams) -> float:
    """Typical cell radius at 1/scale resolution."""
    return params.cell_diameter / params.scale / 2


def _green(image: np.ndarray, params: FindParams) -> np.ndarray:
    """Smoothed green channel at 1/scale, with overlays painted over by their nearest pixel.

    Without this, the scale bar merges with the cells it crosses into one dark blob.
    """
    green = _downsample(image[..., 1].astype(np.float32), params.scale)
    step = params.scale  # one pixel per block is enough to see a bar several px thick
    darkest = image[::step, ::step].max(axis=2)[: green.shape[0], : green.shape[1]]
    overlay = darkest < params.overlay_level
    if overlay.any() and not overlay.all():
        _paint_over(green, ndi.binary_dilation(overlay, iterations=2))  # and its antialiased edge
    return ndi.gaussian_filter(green, params.smooth_sigma)


def _paint_over(channel: np.ndarray, overlay: np.ndarray) -> None:
    """Replace overlay pixels by their nearest other pixel, in place, in a window around them."""
    rows, cols = np.nonzero(overlay)
    r0, c0 = max(rows.min() - 4, 0), max(cols.min() - 4, 0)
    window = (slice(r0, rows.max() + 5), slice(c0, cols.max() + 5))
    nearest = ndi.distance_transform_edt(
        overlay[window], return_distances=False, return_indices=True
    )
    channel[window] = channel[window][tuple(nearest)]


def _masks(image: np.ndarray, params: FindParams) -> tuple[np.ndarray, np.ndarray]:
    """Strict and lenient cell masks at 1/scale resolution (lenient includes strict)."""
    green = _green(image, params)
    if green.max() - green.min() < 1.0:  # a flat field has no cells, and Otsu needs two levels
        empty = np.zeros(green.shape, dtype=bool)
        return empty, empty
    otsu = threshold_otsu(green)
    background, stained = np.median(green[green >= otsu]), np.median(green[green < otsu])
    contrast = background - stained
    strict = _fill_pale_centres(green < background - params.strict_level * contrast, params)
    strict &= ~_seams(green, contrast, params)
    lenient = _fill_pale_centres(green < background - params.pale_level * contrast, params)
    return strict, lenient | strict


def _seams(green: np.ndarray, contrast: float, params: FindParams) -> np.ndarray:
    """Thin pale lines between touching cells: cut out of the strict mask.

    Two cells pressed together leave a line of background between them a pixel or two wide,
    which the blur and the threshold close. The distance transform then has no saddle there, so
    one cell loses its peak to its neighbour and the pair becomes one region. A white top-hat
    narrower than a cell picks such lines (and not pale centres, which are wider).
    """
    width = max(3, int(round(params.seam_width * params.cell_diameter / params.scale)))
    return ndi.white_tophat(green, size=width) > params.seam_level * contrast


def _fill_pale_centres(mask: np.ndarray, params: FindParams) -> np.ndarray:
    """Fill the pale centres of cells, but not the background enclosed between touching cells.

    Both are holes in the mask. A pale centre is ringed by one cell's rim, so it lies within a
    rim's width of the outside of the filled mask; a gap between touching cells is ringed by whole
    cells. Filling gaps would fuse a clump into one blob with no saddle to split it at.
    """
    filled = ndi.binary_fill_holes(mask)
    holes, count = ndi.label(filled & ~mask)
    if count == 0:
        return mask
    in_hole = holes > 0
    labels = holes[in_hole]
    rim = np.full(count + 1, np.inf)
    np.minimum.at(rim, labels, ndi.distance_transform_edt(filled)[in_hole])
    size = np.bincount(labels, minlength=count + 1)
    radius = _radius(params)
    centre = (rim <= params.max_rim * radius) & (size <= params.max_centre_area * np.pi * radius**2)
    return mask | centre[holes]


def _peaks(distance: np.ndarray, params: FindParams) -> np.ndarray:
    """Cell centres: [N, 2] (row, col) peaks of a distance transform."""
    diameter = params.cell_diameter / params.scale
    return peak_local_max(
        distance,
        min_distance=max(1, int(params.peak_distance * diameter)),
        threshold_abs=params.min_peak * diameter,
        exclude_border=False,
    )


def _disc_fraction(mask: np.ndarray, row: int, col: int, radius: float) -> float:
    """Fraction of the disc (clipped to the field) around (row, col) that is True in `mask`."""
    r = int(np.ceil(radius))
    r0, c0 = max(row - r, 0), max(col - r, 0)
    window = mask[r0 : row + r + 1, c0 : col + r + 1]
    rows = np.arange(r0, r0 + window.shape[0])[:, None] - row
    cols = np.arange(c0, c0 + window.shape[1])[None, :] - col
    disc = rows * rows + cols * cols <= radius * radius
    return float(window[disc].mean())


def _pale_centres(
    d_lenient: np.ndarray, strict: np.ndarray, centres: np.ndarray, params: FindParams
) -> list[tuple[int, int]]:
    """Peaks of the lenient mask that are pale cells.

    A pale cell's inscribed disc lies mostly outside the strict mask (else the peak is a halo or a
    bridge around dark cells), and it is not within half its radius of a cell already found.
    """
    found = [tuple(centre) for centre in centres]
    pale = []
    for row, col in _peaks(d_lenient, params):
        radius = d_lenient[row, col]
        if _disc_fraction(strict, row, col, radius) > params.pale_fraction:
            continue
        if all((row - r) ** 2 + (col - c) ** 2 > (radius / 2) ** 2 for r, c in found):
            found.append((row, col))
            pale.append((row, col))
    return pale


def _segment(strict: np.ndarray, lenient: np.ndarray, params: FindParams) -> np.ndarray:
    """Label image at 1/scale: strict-mask cells split by watershed, plus pale cells."""
    d_strict = ndi.distance_transform_edt(strict)
    d_lenient = ndi.distance_transform_edt(lenient)
    centres = _peaks(d_strict, params)
    pale = _pale_centres(d_lenient, strict, centres, params)
    markers = np.zeros(strict.shape, dtype=np.int32)
    for label, (row, col) in enumerate([*map(tuple, centres), *pale], start=1):
        markers[row, col] = label
    labels = watershed(-d_strict, np.where(markers > len(centres), 0, markers), mask=strict)
    if pale:
        pale_labels = watershed(-d_lenient, markers, mask=lenient)
        is_pale = pale_labels > len(centres)
        labels[is_pale] = pale_labels[is_pale]
    return labels


def region_to_cell(region, shape: tuple[int, int], params: FindParams, factor: float | None = None) -> Cell:
    """A region of a label image at 1/`factor` (default: params.scale) as a Cell at full
    resolution, in the annotators' box.

    Annotators draw boxes a few px outside the cell (IML: 6 px a side at 70 px cells), and IoU
    is computed against those boxes, so the mask's box is widened by `box_margin` (within the
    field) and the mask padded to it. `cell_crops` frames crops on the mask, not on this margin.
    """
    factor = params.scale if factor is None else factor
    height, width = shape
    r0, c0, r1, c1 = (int(round(factor * value)) for value in region.bbox)
    r1, c1 = min(r1, height), min(c1, width)
    if factor == int(factor):
        mask = region.image.repeat(int(factor), axis=0).repeat(int(factor), axis=1)[: r1 - r0, : c1 - c0]
    else:
        mask = np.asarray(Image.fromarray(region.image).resize((c1 - c0, r1 - r0), Image.Resampling.NEAREST))
    margin = params.border_margin
    touches = r0 <= margin or c0 <= margin or r1 >= height - margin or c1 >= width - margin
    pad = int(round(params.box_margin * params.cell_diameter))
    top, left = min(pad, r0), min(pad, c0)
    bottom, right = min(pad, height - r1), min(pad, width - c1)
    padded = np.zeros((top + mask.shape[0] + bottom, left + mask.shape[1] + right), dtype=bool)
    padded[top : top + mask.shape[0], left : left + mask.shape[1]] = mask
    x, y, h, w = int(c0 - left), int(r0 - top), *padded.shape
    return Cell(x, y, w, h, int(np.count_nonzero(mask)), bool(touches), padded)
