"""One smear field, start to finish: decode, find cells, crop, stain, classify through Triton.

The batch job's Ray workers and the web page both call `analyse_field`, so a field gives the same
cells, probabilities and counts whichever way it was submitted.
"""
from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from batch.results import FieldResult, classified, failed
from fields.slides import (
    DEFAULT_MAX_PIXELS, SlideError, decode_field, error_from_message, find_classical, is_cell_image, slide_cells,
    too_small,
)
from cells.contract import DETECTOR_CELL_DIAMETER, DETECTOR_NAME, FIELD_NAME
from cells.decision import DEFAULT_THRESHOLD, Decision, read_decision
from cells.errors import BadInput
from cells.repository import model_dir
from deploy.client import ClientOptions, RequestTally, TritonModel

FINDERS = ("classical", "learned")


@dataclass(frozen=True)
class FieldSettings:
    """How a field is read and its cells found; the batch job and the page take the same flags."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_border_cells: bool = False
    stain_normalise: bool = True
    finder: str = "learned"  # the detector served by Triton (cells/detect.py), or "classical" (cells/find.py)
    cell_diameter: float = DETECTOR_CELL_DIAMETER  # a typical red cell, px: fields at other magnifications
    threshold: float | None = None  # p(parasitized) from which a cell is Parasitized; None: the model's (`decided`)

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise BadInput(f"threshold must be between 0 and 1, not {self.threshold}")
        if self.finder not in FINDERS:
            raise BadInput(f"finder must be one of {', '.join(FINDERS)}, not {self.finder!r}")
        if not 10 <= self.cell_diameter <= 1000:
            raise BadInput(f"cell diameter must be 10-1000 px, not {self.cell_diameter}")


def decided(settings: FieldSettings, repository: Path, model: str) -> tuple[FieldSettings, Decision]:
    """The settings with the threshold to use (`settings.threshold` if given, else the one stored
    with the model in `repository`) and the model's decision rule at that threshold."""
    decision = read_decision(model_dir(repository, model)).with_threshold(settings.threshold)
    return replace(settings, threshold=decision.threshold), decision


async def settings_served(settings: FieldSettings, options: ClientOptions) -> tuple[FieldSettings, str]:
    """The settings to use with these servers: the learned finder needs the field model and the
    detector (whole-slide tiles) served beside the classifier; without them, the classical finder,
    and the reason (to be reported)."""
    from deploy.client import DETECTOR, FIELD, unavailable

    if settings.finder != "learned":
        return settings, ""
    reason = await unavailable(field_options(options), FIELD) or await unavailable(detector_options(options), DETECTOR)
    return (replace(settings, finder="classical"), reason) if reason else (settings, "")


def field_options(options: ClientOptions) -> ClientOptions:
    """The classifier's client options, for the field model: its name, one field a request."""
    return replace(options, model=FIELD_NAME, batch_size=1)


def detector_options(options: ClientOptions) -> ClientOptions:
    """The classifier's client options, for the detector: its model name, one field a request."""
    return replace(options, model=DETECTOR_NAME, batch_size=1)


@dataclass
class AnalysedField:
    """The field's result row and cells, the decoded RGB image when it was asked for, and the
    reason when the field could not be read (its kind tells the page which HTTP status to answer)."""

    result: FieldResult
    image: np.ndarray | None = None
    error: SlideError | None = None

    def overlay_png(self) -> bytes:
        """The field with every cell's box coloured by its class, as PNG bytes."""
        from batch.overlay import draw_overlay

        if self.image is None:
            raise ValueError("the image was not kept; analyse with keep_image=True")
        buffer = io.BytesIO()
        draw_overlay(self.image, self.result.cell_rows).save(buffer, format="PNG")
        return buffer.getvalue()


async def analyse_field(
    data: bytes,
    classifier: TritonModel,
    settings: FieldSettings,
    field_id: str,
    source: str,
    keep_image: bool = False,
    tally: RequestTally | None = None,
    detector: TritonModel | None = None,
    field_model: TritonModel | None = None,
) -> AnalysedField:
    """The field's cells classified, or an error row with the one-line reason it cannot be read.

    With `field_model` (the learned finder's default), the field's bytes go to the served field
    model in one request and its cells come back: nothing is decoded here unless `keep_image`.
    Otherwise cells are found here by the classical finder, or by `detector` (the maps from Triton,
    the peaks and regions computed here), and their crops sent to `classifier`; the CPU parts run
    in a thread, so one process can prepare one field while another is classified. Errors of the
    servers (unavailable, rejected) are raised: they are not the field's fault.
    """
    started = time.monotonic()
    if field_model is not None:
        return await _analyse_served(data, field_model, settings, field_id, source, keep_image, tally, started)
    try:
        image = await asyncio.to_thread(decode_field, data, settings.max_pixels)
    except SlideError as error:
        return AnalysedField(failed(field_id, source, str(error)), error=error)
    return await analyse_image(image, classifier, settings, field_id, source, keep_image, tally, detector,
                               started=started)


async def _analyse_served(data: bytes, field_model: TritonModel, settings: FieldSettings, field_id: str, source: str,
                          keep_image: bool, tally: RequestTally | None, started: float) -> AnalysedField:
    """`analyse_field` through the field model: the bytes out, the cells back."""
    threshold = DEFAULT_THRESHOLD if settings.threshold is None else settings.threshold
    options = {"threshold": threshold, "cell_diameter": settings.cell_diameter,
               "keep_border": settings.keep_border_cells, "stain_normalise": settings.stain_normalise,
               "max_pixels": settings.max_pixels}
    cells = await field_model.analyse(data, options, tally)
    reason = cells["error"][0].decode()
    if reason:
        return AnalysedField(failed(field_id, source, reason), error=error_from_message(reason))
    width, height = (int(v) for v in cells["size"])
    if error := too_small(width, height):  # the field model answers no cells; a user is told why
        return AnalysedField(failed(field_id, source, str(error)), error=error)
    image = await asyncio.to_thread(decode_field, data, settings.max_pixels) if keep_image else None
    result = classified(field_id, source, cells["boxes"], cells["areas"], cells["probabilities"], width, height,
                        time.monotonic() - started, threshold)
    return AnalysedField(result, image)


async def analyse_image(
    image: np.ndarray,
    classifier: TritonModel,
    settings: FieldSettings,
    field_id: str,
    source: str,
    keep_image: bool = False,
    tally: RequestTally | None = None,
    detector: TritonModel | None = None,
    owns: Callable[[float, float], bool] | None = None,
    offset: tuple[int, int] = (0, 0),
    started: float | None = None,
) -> AnalysedField:
    """`analyse_field` on a decoded RGB image. For a tile of a whole-slide image: `owns(x, y)` keeps
    only the cells whose centre (in the image's px) the tile owns, cells cut by the image's edge are
    found too (the overlap makes them another tile's), and `offset` moves boxes to level-0 px."""
    from cells.detect import cells_from_maps, detector_input

    started = time.monotonic() if started is None else started
    keep_border = settings.keep_border_cells or owns is not None
    if is_cell_image(image) and owns is None:
        found = None
    elif settings.finder == "learned":
        small, factor = await asyncio.to_thread(detector_input, image, settings.cell_diameter)
        maps = await detector.detect(small, tally)
        found = await asyncio.to_thread(cells_from_maps, maps, image.shape[:2], factor, keep_border)
    else:
        found = await asyncio.to_thread(find_classical, image, keep_border, settings.cell_diameter)
    if owns is not None:
        found = [c for c in found if owns(c.x + c.w / 2, c.y + c.h / 2)]
    prepared = await asyncio.to_thread(slide_cells, image, found, keep_image, settings.stain_normalise)
    probabilities = await classifier.classify(prepared.crops, tally)
    boxes = prepared.boxes + np.array([offset[0], offset[1], 0, 0], np.int32)
    threshold = DEFAULT_THRESHOLD if settings.threshold is None else settings.threshold
    result = classified(field_id, source, boxes, prepared.areas, probabilities, prepared.width,
                        prepared.height, time.monotonic() - started, threshold)
    return AnalysedField(result, prepared.image)
