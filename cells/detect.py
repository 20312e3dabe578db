"""Red cells from the learned detector's maps: peaks of the centre map, a watershed in the cell map.

The detector (train/detector.py, served by Triton as `cells.contract.DETECTOR_NAME`) sees the field
at 1/DETECTOR_SCALE and outputs two maps there: the probability that a pixel is inside a red cell,
and a centre heatmap peaking at each cell's centre. Peaks are the cells; a watershed on the centre
map within the cell mask gives each its region, turned into a full-resolution Cell with the same
box margin and mask as the classical finder's (`cells.find`), so crops are cut the same way.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cells.contract import DETECTOR_CELL_DIAMETER, DETECTOR_MULTIPLE, DETECTOR_SCALE
from cells.find import Cell, FindParams, region_to_cell


@dataclass(frozen=True)
class MapParams:
    """Post-processing of the maps; lengths relative to the cell diameter at the detector's scale.

    Chosen on the test fields of cross-validation fold 0 only (docs/detection.md): a high cell
    level gives masks, hence boxes, as tight as the annotators' (at 0.5: F1 0.936 there, at 0.85: 0.956).
    """

    cell_level: float = 0.85  # a pixel is inside a cell above this probability
    peak_level: float = 0.3  # a cell centre peaks at least this high
    peak_distance: float = 0.3  # closest two centres, x cell diameter
    min_area: float = 0.55  # smallest region, x the area of a typical cell


def detector_input(image: np.ndarray, cell_diameter: float = DETECTOR_CELL_DIAMETER) -> tuple[np.ndarray, float]:
    """The field resized so cells are as large as in training at 1/DETECTOR_SCALE, padded to a
    multiple of DETECTOR_MULTIPLE; returns it (uint8 [H, W, 3]) and the factor back to full resolution."""
    factor = DETECTOR_SCALE * cell_diameter / DETECTOR_CELL_DIAMETER
    height, width = image.shape[:2]
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    padded = np.zeros((-(-size[1] // DETECTOR_MULTIPLE) * DETECTOR_MULTIPLE,
                       -(-size[0] // DETECTOR_MULTIPLE) * DETECTOR_MULTIPLE, 3), np.uint8)
    padded[: size[1], : size[0]] = small
    return padded, factor


def cells_from_maps(maps: np.ndarray, shape: tuple[int, int], factor: float, keep_border: bool = False,
                    params: MapParams = MapParams()) -> list[Cell]:
    """Cells at full resolution (field `shape`) from maps [h, w, 2] at 1/`factor`."""
    return labelled_cells(maps, shape, factor, keep_border, params)[0]


def labelled_cells(maps: np.ndarray, shape: tuple[int, int], factor: float, keep_border: bool = False,
                   params: MapParams = MapParams()) -> tuple[list[Cell], np.ndarray, np.ndarray]:
    """`cells_from_maps`, with the label map the cells' masks are cut from (int32 [h', w'] at
    1/`factor`, 0 outside every cell) and each cell's label in it (int32 [N]): the crop graph's
    inputs (export/crop_graph.py)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    height, width = shape
    rows, cols = round(height / factor), round(width / factor)
    cell, centre = maps[:rows, :cols, 0], maps[:rows, :cols, 1]
    mask = cell > params.cell_level
    diameter = DETECTOR_CELL_DIAMETER / DETECTOR_SCALE
    peaks = label_peaks(centre, ndi.label(mask | (centre > params.peak_level))[0],
                        max(1, int(params.peak_distance * diameter)), params.peak_level)
    if not len(peaks):
        return [], np.zeros(centre.shape, np.int32), np.zeros(0, np.int32)
    markers = np.zeros(centre.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-centre, markers, mask=mask | (markers > 0)).astype(np.int32)
    regions = [r for r in _regions(labels) if r.area >= params.min_area * np.pi * (diameter / 2) ** 2]
    find = FindParams(scale=1, cell_diameter=DETECTOR_CELL_DIAMETER * factor / DETECTOR_SCALE)
    cells = [(region_to_cell(region, shape, find, factor), region.label) for region in regions]
    kept = [(c, label) for c, label in cells if keep_border or not c.touches_border]
    return [c for c, _ in kept], labels, np.array([label for _, label in kept], np.int32)


@dataclass(frozen=True)
class _Region:
    """What `region_to_cell` reads of a labelled region (as skimage's regionprops names it)."""

    label: int
    area: int
    bbox: tuple[int, int, int, int]  # min row, min col, max row, max col (exclusive)
    image: np.ndarray  # bool, the region within its bbox


def _regions(labels: np.ndarray) -> list[_Region]:
    """The regions of a label image in label order: one pass for every area and bounding box, not
    skimage's regionprops objects (a third of the post-processing's time at ~150 regions a field)."""
    from scipy import ndimage as ndi

    areas = np.bincount(labels.ravel())
    regions = []
    for index, where in enumerate(ndi.find_objects(labels)):
        if where is not None:
            rows, cols = where
            regions.append(_Region(index + 1, int(areas[index + 1]), (rows.start, cols.start, rows.stop, cols.stop),
                                   labels[where] == index + 1))
    return regions


def label_peaks(image: np.ndarray, labels: np.ndarray, min_distance: int, threshold: float) -> np.ndarray:
    """Peaks [N, 2] (row, col) of `image` within each labelled region, exactly those of
    `skimage.feature.peak_local_max(image, min_distance, threshold, labels=labels)` in the same
    order, without its Python loop over every region (~2x faster on a field).

    As there, pixels within `min_distance` of the edge are left out; a pixel is a candidate when
    no pixel of its own region within `min_distance` (Chebyshev) is higher, and it is above
    `threshold`; in each region, candidates are taken highest first and those closer than
    `min_distance` to one taken are dropped. Regions are told apart in a single maximum filter by
    lifting each region's values by its label times the image's range: a window whose other
    regions all have lower labels (or all higher, filtered the other way round) is decided by one
    of the two filters; the rare pixel between both kinds is decided on its own.
    """
    border = min_distance
    if min(image.shape) <= 2 * border:
        return np.zeros((0, 2), dtype=np.intp)
    peaks = _interior_peaks(image[border:-border, border:-border], labels[border:-border, border:-border],
                            min_distance, threshold)
    return peaks + border


def _interior_peaks(image: np.ndarray, labels: np.ndarray, min_distance: int, threshold: float) -> np.ndarray:
    """`label_peaks` on an image whose edges are not left out."""
    from scipy import ndimage as ndi

    image = image.astype(np.float64)
    size = 2 * min_distance + 1
    inside = labels > 0
    lift = labels * (float(image.max() - image.min()) + 1.0)
    up = np.where(inside, image + lift, -np.inf)
    down = np.where(inside, image - lift, -np.inf)
    highest = ndi.maximum_filter(labels, size=size)
    lowest = -ndi.maximum_filter(np.where(inside, -labels, np.iinfo(labels.dtype).min), size=size)
    candidate = np.where(highest == labels, ndi.maximum_filter(up, size=size) == up,
                         (lowest == labels) & (ndi.maximum_filter(down, size=size) == down)) & inside
    for row, col in np.argwhere(inside & (highest != labels) & (lowest != labels)):
        window = (slice(max(row - min_distance, 0), row + min_distance + 1),
                  slice(max(col - min_distance, 0), col + min_distance + 1))
        candidate[row, col] = image[row, col] >= image[window][labels[window] == labels[row, col]].max()
    count = int(labels.max())
    region_size = np.bincount(labels.ravel(), minlength=count + 1)
    trivial = np.flatnonzero((np.bincount(labels[candidate], minlength=count + 1) == region_size) & (region_size > 0))
    for label in trivial[trivial > 0]:  # flat regions: only their isolated pixels, as skimage does
        roi = ndi.find_objects(labels == label)[0]
        region = labels[roi] == label
        candidate[roi] = np.where(region, region & ~ndi.binary_opening(region), candidate[roi])
    candidate &= image > threshold
    rows, cols = np.nonzero(candidate)
    order = np.lexsort((-image[rows, cols], labels[rows, cols]))  # by region, highest first, stable
    rows, cols, owner = rows[order], cols[order], labels[rows[order], cols[order]]
    keep = np.ones(len(rows), dtype=bool)
    for start, end in _runs(owner):
        for i in range(start, end):
            if keep[i]:
                near = (np.abs(rows[i + 1 : end] - rows[i]) < min_distance) & (np.abs(cols[i + 1 : end] - cols[i]) < min_distance)
                keep[i + 1 : end] &= ~near
    return np.stack([rows[keep], cols[keep]], axis=1)


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values with more than one element."""
    edges = np.flatnonzero(np.diff(values)) + 1
    bounds = np.concatenate([[0], edges, [len(values)]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b - a > 1]


def onnx_finder(repository: Path, threads: int = 0, cell_diameter: float = DETECTOR_CELL_DIAMETER,
                keep_border: bool = True) -> Callable[[np.ndarray], list[Cell]]:
    """The repository's detector run in-process by ONNX Runtime, as a finder: field -> cells.
    For measuring it (`smearscope evaluate-detection --finder learned`); serving goes through Triton."""
    from cells.contract import DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT
    from cells.repository import served_onnx
    from cells.runtime import OnnxModel

    model = OnnxModel(served_onnx(repository, DETECTOR_NAME), batch_size=1, threads=threads,
                      input_name=DETECTOR_INPUT, output_name=DETECTOR_OUTPUT)

    def find(image: np.ndarray) -> list[Cell]:
        small, factor = detector_input(image, cell_diameter)
        return cells_from_maps(model(small[None])[0], image.shape[:2], factor, keep_border)

    return find
