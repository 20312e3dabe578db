"""Training cells from a lab's annotated smear fields (IML format), cut as the batch job cuts them.

Each field's cells are found by the finder the batch job uses (the learned detector by default),
and each found cell takes the label of the annotated box it matches (IoU >= 0.5): so the crop is
exactly what the batch job will classify, mask and all. An annotated cell no found cell matches
is still used (infected cells are scarce): cut from its box with the inscribed ellipse as mask.
Stain normalisation, when on, is fitted per field over the cells the batch job would see. The
split is by field, stratified by whether a field has parasites, so no field is on both sides.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cells.contract import PARASITIZED, UNINFECTED
from cells.crop import cut_cell
from cells.detection_eval import (
    CELL_TYPES,
    IGNORED_TYPES,
    INFECTED_TYPES,
    MIN_IOU,
    AnnotatedBox,
    load_annotations,
    load_rgb,
    match_boxes,
)
from cells.errors import BadInput
from cells.find import Cell, cell_crops
from cells.stain import normalise_stain
from train.data import stratified_split

Finder = Callable[[np.ndarray], list[Cell]]


def label_of(kind: str) -> int | None:
    """The class of an annotated type: a parasite stage is Parasitized, a red cell Uninfected;
    'difficult' (and any type that is no cell) None, left out of training."""
    if kind in INFECTED_TYPES:
        return PARASITIZED
    if kind in CELL_TYPES:
        return UNINFECTED
    return None


@dataclass
class FieldCells:
    """Crops [N, 128, 128, 3] uint8 with labels, the annotated type and the field each came from."""

    images: np.ndarray
    labels: np.ndarray
    kinds: list[str]
    fields: list[str]
    counts: Counter = field(default_factory=Counter)  # matched, unmatched, left out, outside

    def select(self, names: set[str]) -> FieldCells:
        keep = [f in names for f in self.fields]
        return FieldCells(self.images[np.array(keep, bool)], self.labels[np.array(keep, bool)],
                          [k for k, kept in zip(self.kinds, keep) if kept], [f for f in self.fields if f in names],
                          self.counts)


def clip_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int] | None:
    """The part of a box inside the field, or None when under 2 px of it is."""
    x, y, w, h = box
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return x0, y0, x1 - x0, y1 - y0


def ellipse_mask(w: int, h: int) -> np.ndarray:
    """The ellipse inscribed in a w x h box, bool [h, w]."""
    rows, cols = np.ogrid[:h, :w]
    return ((rows + 0.5 - h / 2) / (h / 2)) ** 2 + ((cols + 0.5 - w / 2) / (w / 2)) ** 2 <= 1.0


def cut_field(image: np.ndarray, annotated: list[AnnotatedBox], finder: Finder,
              stain_normalise: bool) -> tuple[np.ndarray, list[str], Counter]:
    """One field's crops of annotated cells, their annotated types, and how each annotation was used."""
    height, width = image.shape[:2]
    counts: Counter = Counter()
    wanted = []
    for box in annotated:
        label = label_of(box.type)
        clipped = clip_box(box.box, width, height)
        if label is None:
            counts["left out: " + (box.type if box.type in IGNORED_TYPES else "other type")] += 1
        elif clipped is None:
            counts["left out: outside the field"] += 1
        else:
            wanted.append((clipped, box.type))
    found = finder(image)
    found_crops = cell_crops(image, found)
    match = match_boxes([c.box for c in found], [b for b, _ in wanted], MIN_IOU)
    matched = {true: predicted for predicted, true in match.pairs}
    extra = [i for i in range(len(wanted)) if i not in matched]
    extra_crops = [cut_cell(image, wanted[i][0], ellipse_mask(*wanted[i][0][2:])) for i in extra]
    crops = np.concatenate([found_crops, np.array(extra_crops, np.uint8).reshape(-1, *found_crops.shape[1:])])
    if stain_normalise:
        crops = normalise_stain(crops)
    crop_row = matched | {i: len(found) + k for k, i in enumerate(extra)}  # annotation -> its row of `crops`
    counts["matched a found cell"] += len(matched)
    counts["cut from the annotated box"] += len(extra)
    return crops[[crop_row[i] for i in range(len(wanted))]], [kind for _, kind in wanted], counts


def load_field_cells(annotations: Path, images: Path, finder: Finder, stain_normalise: bool,
                     names: set[str] | None = None) -> FieldCells:
    """Labelled crops of every annotated field found in `images` (or of `names` only)."""
    table = load_annotations(annotations)
    chosen = sorted(n for n in table if (names is None or n in names) and (Path(images) / n).is_file())
    if not chosen:
        raise BadInput(f"no image of {annotations} is in {images}")
    parts, kinds, fields, counts = [], [], [], Counter()
    for name in chosen:
        crops, field_kinds, field_counts = cut_field(load_rgb(Path(images) / name), table[name], finder,
                                                     stain_normalise)
        parts.append(crops)
        kinds += field_kinds
        fields += [name] * len(field_kinds)
        counts += field_counts
    labels = np.array([label_of(kind) for kind in kinds], np.int32)
    return FieldCells(np.concatenate(parts), labels, kinds, fields, counts)


def has_parasites(annotated: list[AnnotatedBox]) -> bool:
    return any(box.type in INFECTED_TYPES for box in annotated)


def split_fields(annotations: Path, val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Field-level split, stratified: fields with and without parasites are split separately."""
    table = load_annotations(annotations)
    return stratified_split(list(table), lambda name: has_parasites(table[name]), val_fraction, seed)
