"""One smear field, start to finish: decode, find cells, crop, stain, classify through Triton.

The batch job's Ray workers and the web page both call `analyse_field`, so a field gives the same
cells, probabilities and counts whichever way it was submitted.
"""
from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass

import numpy as np

from batch.results import SlideResult, classified, failed
from batch.slides import DEFAULT_MAX_PIXELS, SlideError, prepare
from deploy.client import RequestTally, TritonClassifier


@dataclass(frozen=True)
class FieldSettings:
    """How a field is read and its cells chosen; the batch job and the page take the same flags."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_border_cells: bool = False
    stain_normalise: bool = True


@dataclass
class AnalysedField:
    """The field's result row and cells, the decoded RGB image when it was asked for, and the
    reason when the field could not be read (its kind tells the page which HTTP status to answer)."""

    result: SlideResult
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
    classifier: TritonClassifier,
    settings: FieldSettings,
    slide: str,
    source: str,
    keep_image: bool = False,
    tally: RequestTally | None = None,
) -> AnalysedField:
    """The field's cells classified, or an error row with the one-line reason it cannot be read.

    The CPU part runs in a thread, so one process can classify one field while it prepares the next.
    Errors of the servers (unavailable, rejected) are raised: they are not the field's fault.
    """
    started = time.monotonic()
    try:
        prepared = await asyncio.to_thread(
            prepare, data, max_pixels=settings.max_pixels, keep_image=keep_image,
            keep_border=settings.keep_border_cells, stain_normalise=settings.stain_normalise,
        )
    except SlideError as error:
        return AnalysedField(failed(slide, source, str(error)), error=error)
    probabilities = await classifier.classify(prepared.crops, tally)
    result = classified(slide, source, prepared.boxes, prepared.areas, probabilities, prepared.width,
                        prepared.height, time.monotonic() - started)
    return AnalysedField(result, prepared.image)
