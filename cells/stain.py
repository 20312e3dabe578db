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

from dataclasses import dataclass

import numpy as np

BACKGROUND_LEVEL = 20  # a crop pixel this dark in every channel is the black background
MIN_CELLS = 10  # fewer cells tell too little about the slide's stain: left as they are


@dataclass(frozen=True)
class StainStats:
    """Mean and standard deviation of a set of cells' pixels in CIELAB (L, a, b)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


REFERENCE = StainStats(mean=(66.14, 11.08, -4.37), std=(7.63, 4.41, 3.78))


def _cell_lab(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cell pixels of uint8 crops [..., 3] in CIELAB [P, 3], and where they are (bool [...])."""
    from skimage.color import rgb2lab

    cell = crops.max(axis=-1) > BACKGROUND_LEVEL
    lab = rgb2lab(crops[cell][None].astype(np.float32) / 255.0)[0]
    return lab, cell


def stain_stats(crops: np.ndarray) -> StainStats:
    """Colour statistics of the cells in uint8 crops [N, H, W, 3] (black background left out)."""
    lab, _ = _cell_lab(crops)
    if not len(lab):
        raise ValueError("no cell pixels in these crops")
    return StainStats(tuple(lab.mean(axis=0).tolist()), tuple(lab.std(axis=0).tolist()))


def normalise_stain(crops: np.ndarray, reference: StainStats = REFERENCE) -> np.ndarray:
    """One slide's crops [N, H, W, 3] uint8, recoloured so their cells' statistics match `reference`.

    The black background stays black. Slides with fewer than MIN_CELLS crops come back unchanged.
    """
    if len(crops) < MIN_CELLS:
        return crops
    from skimage.color import lab2rgb

    lab, cell = _cell_lab(crops)
    source_mean, source_std = lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-3)
    lab = (lab - source_mean) * (np.asarray(reference.std) / source_std) + np.asarray(reference.mean)
    rgb = lab2rgb(lab[None])[0]
    out = crops.copy()
    out[cell] = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return out
