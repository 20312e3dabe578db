"""The field model's work, in the server: encoded fields in, their cells out.

Decode (PIL, on the CPU), the detector, its post-processing (`cells.detect`, on the CPU: a
watershed on maps 1/16 the field's pixels), the cells' crops, then the classifier once over the
crops of every field of the call: the server's dynamic batcher gives a call the fields that arrived
together, so the classifier's batches span fields. Crops come from the crop graph
(export/crop_graph.py, run by a runtime: the GPU on a GPU host) or, with `crops="numpy"`, from
`cells.find.cell_crops` and `cells.stain.normalise_stain`: the same pixels within one level, and on
a CPU the faster of the two (docs/performance.md).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cells.contract import CLASSES, CROPS_INPUTS, DETECTOR_CELL_DIAMETER, PARASITIZED
from cells.crop import crop_cell, crop_windows
from fields.slides import CELL_IMAGE_MIN_SIDE, DEFAULT_MAX_PIXELS, SlideError, decode, is_cell_image

CROP_ENGINES = ("graph", "numpy")
Model = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FieldRequest:
    """One field as a client sent it, with its optional settings (cells.contract.FIELD_OPTIONS)."""

    data: bytes
    threshold: float | None = None  # None: the classifier's published threshold
    cell_diameter: float = DETECTOR_CELL_DIAMETER
    keep_border: bool = False
    stain_normalise: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class FieldCells:
    """A field's cells (boxes in the field's px, mask areas, probabilities, calls), or why it has none."""

    width: int = 0
    height: int = 0
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))  # int32 [n, 4]
    areas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # int32 [n]
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, len(CLASSES)), np.float32))  # [n, 2]
    threshold: float = 0.5
    error: str = ""

    @property
    def calls(self) -> np.ndarray:
        """Each cell's class index: Parasitized when p(Parasitized) >= threshold."""
        return np.where(self.probabilities[:, PARASITIZED] >= self.threshold, PARASITIZED, 1 - PARASITIZED).astype(np.int32)

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.calls, minlength=len(CLASSES)).astype(np.int32)


class FieldPipeline:
    """Fields to cells with the given models: `detector` (uint8 [1, H, W, 3] -> maps), `classifier`
    (crops -> probabilities) and `crop_graph` (the crop graph's inputs as a dict -> crops), each a
    runtime's callable (cells.runtime); `threshold` is the classifier's published one."""

    def __init__(self, detector: Model, classifier: Model, crop_graph: Callable[[dict], np.ndarray] | None,
                 threshold: float, crops: str = "graph") -> None:
        if crops not in CROP_ENGINES or (crops == "graph" and crop_graph is None):
            raise ValueError(f"crops must be one of {CROP_ENGINES} (graph needs the crop graph), not {crops!r}")
        self.detector, self.classifier, self.crop_graph = detector, classifier, crop_graph
        self.threshold, self.crops = threshold, crops

    def __call__(self, requests: list[FieldRequest]) -> list[FieldCells]:
        """Every request's cells, its crops classified together with the other requests'."""
        prepared = [self._prepare(request) for request in requests]
        crops = [crops for _, crops in prepared if crops is not None and len(crops)]
        probabilities = self.classifier(np.concatenate(crops)) if crops else np.zeros((0, len(CLASSES)), np.float32)
        start = 0
        for cells, crops in prepared:
            if crops is not None and len(crops):
                cells.probabilities = np.asarray(probabilities[start : start + len(crops)], np.float32)
                start += len(crops)
        return [cells for cells, _ in prepared]

    def _prepare(self, request: FieldRequest) -> tuple[FieldCells, np.ndarray | None]:
        """The field's cells without probabilities, and their crops (None when there are none)."""
        threshold = self.threshold if request.threshold is None else request.threshold
        try:
            image = decode(request.data, request.max_pixels)
        except SlideError as error:
            return FieldCells(threshold=threshold, error=str(error)), None
        height, width = image.shape[:2]
        cells = FieldCells(width, height, threshold=threshold)
        if min(height, width) < CELL_IMAGE_MIN_SIDE:  # a 1x1 or a thin strip: nothing to find
            return cells, None
        if is_cell_image(image):  # one cell crop, as in the NIH set: classified whole
            cells.boxes, cells.areas = np.array([[0, 0, width, height]], np.int32), np.array([width * height], np.int32)
            return cells, crop_cell(image)[None]
        return cells, self._cells(image, request, cells)

    def _cells(self, image: np.ndarray, request: FieldRequest, cells: FieldCells) -> np.ndarray | None:
        """Find the field's cells (filling `cells`' boxes and areas) and cut their crops."""
        from cells.detect import detector_input, labelled_cells

        small, factor = detector_input(image, request.cell_diameter)
        found, labels, ids = labelled_cells(self.detector(small[None])[0], image.shape[:2], factor, request.keep_border)
        if not found:
            return None
        cells.boxes = np.array([[c.x, c.y, c.w, c.h] for c in found], np.int32)
        cells.areas = np.array([c.area for c in found], np.int32)
        if self.crops == "numpy":
            from cells.find import cell_crops
            from cells.stain import normalise_stain

            crops = cell_crops(image, found)
            return normalise_stain(crops) if request.stain_normalise else crops
        return self.crop_graph(crop_graph_inputs(image, found, labels, ids, factor, request.stain_normalise))


def crop_graph_inputs(image: np.ndarray, cells: list, labels: np.ndarray, ids: np.ndarray, factor: float,
                      stain_normalise: bool = True) -> dict[str, np.ndarray]:
    """The crop graph's inputs (cells.contract.CROPS_INPUTS) for a field's cells from
    `cells.detect.labelled_cells`: the squares `cut_cell` cuts around their masks, with their labels."""
    from cells.find import mask_box

    windows = crop_windows(np.array([mask_box(c)[0] for c in cells]))
    inputs = (image, labels, np.concatenate([windows, ids[:, None]], axis=1).astype(np.int32),
              np.array([factor], np.float32), np.array([stain_normalise]))
    return dict(zip(CROPS_INPUTS, inputs))
