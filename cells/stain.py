"""Per-slide stain normalisation of cell crops to the colour of the training data.

The classifier learned NIH P. falciparum cells: pink to lavender on black. Fields from other labs
are stained and white-balanced differently (IML fields range from grey-green to deep magenta),
and a model that reads colour calls whole slides of healthy magenta cells Parasitized. Reinhard
et al. (2001) colour transfer fixes the slide's colour without touching what is inside a cell:
in CIELAB, every channel of the slide's cell pixels is shifted and scaled so that its mean and
spread match a typical training slide. One transform per slide keeps a parasite darker and
bluer than its neighbours; per crop it would wash a heavily infected cell out to the mean.

The reference is the median over the model's 77 training patients of each patient's mean and
standard deviation, measured with `smearscope data stain-reference --data
../shared/data/nih-cells --split model_repository/malaria_resnet50v2/assets/split.json`.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np

BACKGROUND_LEVEL = 20  # a crop pixel this dark in every channel is the black background
MIN_CELLS = 10  # fewer cells tell too little about the slide's stain: left as they are


@dataclass(frozen=True)
class StainStats:
    """Mean and standard deviation of a set of cells' pixels in CIELAB (L, a, b)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


REFERENCE = StainStats(mean=(66.26, 11.09, -4.37), std=(7.6, 4.41, 3.8))


class _ColourTables:
    """Two tables over the 2^24 RGB colours, kept for the process: which colours a set of crops
    holds (bool, 16 MB) and each one's index among them (int32, 64 MB).

    Marking colours in a table finds a slide's ~0.1 M distinct colours among its ~1.5 M cell pixels
    without sorting them (`np.unique` is ~20x slower). Allocating the tables for every slide cost
    more than using them (page faults), so they are made once and left clean after each use; a lock
    makes one thread at a time use them.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.present = np.zeros(1 << 24, dtype=bool)
        self.index = np.zeros(1 << 24, dtype=np.int32)

    def distinct(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distinct values of `packed` (int32 colour codes), ascending, and each one's index."""
        with self.lock:
            self.present[packed] = True
            codes = np.flatnonzero(self.present)
            self.present[codes] = False
            self.index[codes] = np.arange(len(codes), dtype=np.int32)
            return codes, self.index[packed]


@functools.cache
def _colour_tables() -> _ColourTables:
    return _ColourTables()


def _cell_colours(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct colours of the cells in uint8 crops [..., 3]: CIELAB [K, 3], how many pixels
    have each [K], each cell pixel's colour index [P], and where the cell pixels are (bool [...]).

    A slide's ~1.5 M cell pixels hold ~0.1 M distinct colours, so those are converted, not every pixel.
    """
    from skimage.color import rgb2lab

    pixels = np.ascontiguousarray(crops).reshape(-1, 3)
    cell = np.maximum(np.maximum(pixels[:, 0], pixels[:, 1]), pixels[:, 2]) > BACKGROUND_LEVEL
    # Each pixel as one 3-byte item: selecting items is ~8x faster than selecting 3-byte rows.
    chosen = pixels.view("V3").reshape(-1)[cell].view(np.uint8).reshape(-1, 3)
    packed = (chosen[:, 0].astype(np.int32) << 16) | (chosen[:, 1].astype(np.int32) << 8) | chosen[:, 2]
    codes, inverse = _colour_tables().distinct(packed)
    counts = np.bincount(inverse, minlength=len(codes))
    rgb = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=-1)
    lab = rgb2lab(rgb[None].astype(np.float32) / 255.0)[0]
    return lab, counts, inverse, cell.reshape(crops.shape[:-1])


def _moments(lab: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over pixels, from distinct colours and their pixel counts."""
    weights = counts / counts.sum()
    mean = weights @ lab
    return mean, np.sqrt(weights @ (lab - mean) ** 2)


def stain_stats(crops: np.ndarray) -> StainStats:
    """Colour statistics of the cells in uint8 crops [N, H, W, 3] (black background left out)."""
    lab, counts, _, _ = _cell_colours(crops)
    if not len(lab):
        raise ValueError("no cell pixels in these crops")
    mean, std = _moments(lab, counts)
    return StainStats(tuple(mean.tolist()), tuple(std.tolist()))


def normalise_stain(crops: np.ndarray, reference: StainStats = REFERENCE) -> np.ndarray:
    """One slide's crops [N, H, W, 3] uint8, recoloured so their cells' statistics match `reference`.

    The black background stays black. Slides with fewer than MIN_CELLS crops, or whose crops are
    all background (an almost black field), come back unchanged: there is no stain to measure.
    """
    if len(crops) < MIN_CELLS:
        return crops
    from skimage.color import lab2rgb

    lab, counts, inverse, cell = _cell_colours(crops)
    if not len(lab):
        return crops
    mean, std = _moments(lab, counts)
    lab = (lab - mean) * (np.asarray(reference.std) / np.maximum(std, 1e-3)) + np.asarray(reference.mean)
    recoloured = np.clip(np.rint(lab2rgb(lab[None])[0] * 255.0), 0, 255).astype(np.uint8)
    out = np.ascontiguousarray(crops).copy()
    pixels = out.reshape(-1, 3).view("V3").reshape(-1)
    pixels[cell.reshape(-1)] = np.ascontiguousarray(recoloured).view("V3").reshape(-1)[inverse]
    return out
