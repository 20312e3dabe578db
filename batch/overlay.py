"""A PNG per field, and an overview per whole-slide image, with every cell's box coloured by its class,
for people to check the job."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from batch.inputs import Slide, slide_name
from batch.storage import Location, join
from batch.wsi import open_slide, read_region

OVERLAYS = "overlays"
COLOURS = {"Parasitized": (230, 30, 30), "Uninfected": (30, 200, 60)}
LINE_WIDTHS = {"Parasitized": 3, "Uninfected": 2}  # parasitized boxes drawn thicker, to find them at a glance


def overlay_path(output: Location, slide: Slide) -> str:
    """overlays/<slide file stem>-<slide key>.png: findable by name, unique by key, safe whatever the name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(slide_name(slide.slide_id)).stem).strip("._")[:64]
    return join(output, OVERLAYS, f"{stem or 'slide'}-{slide.key}.png")


def draw_overlay(image: np.ndarray, cell_rows: list[dict]) -> Image.Image:
    """The field with each cell's box in its class colour (Parasitized drawn thicker)."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for row in cell_rows:
        box = (row["x"], row["y"], row["x"] + row["w"] - 1, row["y"] + row["h"] - 1)
        draw.rectangle(box, outline=COLOURS[row["label"]], width=LINE_WIDTHS[row["label"]])
    return canvas


def overview(path: str, cell_rows: list[dict], max_side: int = 4096) -> np.ndarray:
    """The whole-slide image's lowest level no larger than `max_side`, with every cell's box drawn
    in its class colour."""
    slide = open_slide(path, 0)
    level = next((i for i, (h, w) in enumerate(slide.levels) if max(h, w) <= max_side), len(slide.levels) - 1)
    height, width = slide.levels[level]
    canvas = Image.fromarray(read_region(path, (0, 0, width, height), level))
    draw = ImageDraw.Draw(canvas)
    sx, sy = width / slide.width, height / slide.height
    for row in cell_rows:
        box = (row["x"] * sx, row["y"] * sy, (row["x"] + row["w"]) * sx, (row["y"] + row["h"]) * sy)
        draw.rectangle(box, outline=COLOURS[row["label"]], width=1)
    return np.asarray(canvas)
