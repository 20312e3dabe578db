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
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.measure import regionprops
    from skimage.segmentation import watershed

    height, width = shape
    rows, cols = round(height / factor), round(width / factor)
    cell, centre = maps[:rows, :cols, 0], maps[:rows, :cols, 1]
    mask = cell > params.cell_level
    diameter = DETECTOR_CELL_DIAMETER / DETECTOR_SCALE
    peaks = peak_local_max(centre, min_distance=max(1, int(params.peak_distance * diameter)),
                           threshold_abs=params.peak_level, labels=ndi.label(mask | (centre > params.peak_level))[0])
    if not len(peaks):
        return []
    markers = np.zeros(centre.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-centre, markers, mask=mask | (markers > 0))
    regions = [r for r in regionprops(labels) if r.area >= params.min_area * np.pi * (diameter / 2) ** 2]
    find = FindParams(scale=1, cell_diameter=DETECTOR_CELL_DIAMETER * factor / DETECTOR_SCALE)
    cells = [region_to_cell(region, shape, find, factor) for region in regions]
    return [c for c in cells if keep_border or not c.touches_border]


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
