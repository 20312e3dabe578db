"""Find red blood cells in a whole Giemsa thin-smear field, classically (no learned model).

Pipeline, on a 2x downsampled field for speed (cells are ~80 px across, so 40 px is plenty):
threshold the green channel (Giemsa-stained cells absorb green; the background does not) with
Otsu, fill the pale cell centres, split touching cells by a watershed on the distance transform,
then drop blobs whose size or shape is not a single red cell (platelets, debris, unsplit clumps).
Masks are then taken back to full resolution for the crops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.measure import regionprops
from skimage.morphology import remove_small_holes
from skimage.segmentation import watershed

from cells.crop import crop_cell


@dataclass(frozen=True)
class FindParams:
    """Tunables; defaults measured on the 100 IML P. vivax fields (see cells/detection_eval.py)."""

    scale: int = 2  # segment at 1/scale resolution
    smooth_sigma: float = 1.0  # Gaussian blur before thresholding, px at 1/scale
    cell_diameter: float = 82.0  # typical red cell, px at full resolution
    peak_distance: float = 0.25  # min distance between cell centres, x cell_diameter
    min_area: float = 0.25  # x the area of a typical cell
    max_area: float = 2.0
    min_solidity: float = 0.85  # a single red cell is convex; clumps and debris are not
    threshold_level: float = 0.5
    rim_width: int = 7
    rim_level: float = 0.15
    min_peak: float = 0.15
    rim_weight: float = 20.0
    max_hole: float = 0.3
    border_margin: int = 2  # px; a mask this close to an edge touches the border


DEFAULTS = FindParams()


@dataclass(frozen=True)
class Cell:
    """One found cell: bounding box (top-left x, y and size, full-resolution px) and mask."""

    x: int
    y: int
    w: int
    h: int
    area: int  # mask pixel count
    touches_border: bool  # cut by the field edge: a partial cell
    mask: np.ndarray = field(repr=False, compare=False)  # bool [h, w], True on the cell

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h


def _check_rgb(image: np.ndarray) -> None:
    """Reject anything but an H x W x 3 array early, with a message that names the problem."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an H x W x 3 RGB image, got {shape}")


def _downsample(channel: np.ndarray, scale: int) -> np.ndarray:
    """Block mean: cheap, and averages out JPEG noise at the same time."""
    height, width = (channel.shape[0] // scale) * scale, (channel.shape[1] // scale) * scale
    blocks = channel[:height, :width].reshape(height // scale, scale, width // scale, scale)
    return blocks.mean(axis=(1, 3))


def _foreground(image: np.ndarray, params: FindParams) -> tuple[np.ndarray, np.ndarray]:
    """Cell pixels at 1/scale resolution (pale centres filled), and the cell interiors.

    Interiors are the cell pixels minus the dark rims that pale cells show where they touch or
    overlap: a black top-hat narrower than a cell finds those rims and nothing inside a cell.
    """
    green = _downsample(image[..., 1].astype(np.float32), params.scale)
    green = ndi.gaussian_filter(green, params.smooth_sigma)
    if green.max() - green.min() < 1.0:  # a flat field has no cells, and Otsu needs two levels
        empty = np.zeros(green.shape, dtype=bool)
        return empty, empty
    otsu = threshold_otsu(green)
    background, cells = np.median(green[green >= otsu]), np.median(green[green < otsu])
    contrast = background - cells
    mask = green < background - params.threshold_level * contrast
    cell_area = _cell_area(params)
    mask = remove_small_holes(mask, max_size=int(params.max_hole * cell_area))
    size = params.rim_width
    rims = (ndi.grey_closing(green, size=(size, size)) - green) / contrast
    return mask, rims


def _cell_area(params: FindParams) -> float:
    """Area of a typical cell at 1/scale resolution."""
    return np.pi * (params.cell_diameter / params.scale / 2) ** 2


def _split(mask: np.ndarray, rims: np.ndarray, params: FindParams) -> np.ndarray:
    """Label image: one label per cell, split where interiors meet at rims or narrow necks."""
    interiors = mask & (rims < params.rim_level)
    distance = ndi.distance_transform_edt(interiors)
    min_distance = max(1, int(params.peak_distance * params.cell_diameter / params.scale))
    peaks = peak_local_max(
        distance,
        min_distance=min_distance,
        threshold_abs=params.min_peak * params.cell_diameter / params.scale,
        labels=ndi.label(interiors)[0],
        exclude_border=False,
    )
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    elevation = params.rim_weight * rims - ndi.distance_transform_edt(mask)
    return watershed(elevation, markers, mask=mask)


def _to_cell(label: int, bbox: tuple[int, int, int, int], labels_full: np.ndarray, margin: int) -> Cell:
    """The cell with this label, given its bounding box (min_row, min_col, max_row, max_col)."""
    y0, x0, y1, x1 = bbox
    height, width = labels_full.shape
    touches = y0 <= margin or x0 <= margin or y1 >= height - margin or x1 >= width - margin
    mask = labels_full[y0:y1, x0:x1] == label
    return Cell(x0, y0, x1 - x0, y1 - y0, int(mask.sum()), bool(touches), mask)


def find_cells(
    image: np.ndarray, params: FindParams = DEFAULTS, keep_border: bool = False
) -> list[Cell]:
    """All red cells in an H x W x 3 uint8 RGB field, in raster order of their label.

    Cells whose mask comes within `params.border_margin` px of the field edge are partial, so
    they are dropped unless `keep_border` (a partial cell is a poor classifier input and would
    bias per-field counts). Raises ValueError if the image is not H x W x 3.
    """
    _check_rgb(image)
    labels = _split(*_foreground(image, params), params)
    scale = params.scale
    labels_full = np.zeros(image.shape[:2], dtype=labels.dtype)
    up = labels.repeat(scale, axis=0).repeat(scale, axis=1)
    labels_full[: up.shape[0], : up.shape[1]] = up
    cell_area = _cell_area(params)
    cells = []
    for region in regionprops(labels):
        if not params.min_area * cell_area <= region.area <= params.max_area * cell_area:
            continue
        if region.solidity < params.min_solidity:
            continue
        bbox = tuple(scale * v for v in region.bbox)
        cell = _to_cell(region.label, bbox, labels_full, params.border_margin)
        if keep_border or not cell.touches_border:
            cells.append(cell)
    return cells
