"""The first look at a data folder: a montage of cells per class, and counts."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from cells.contract import CLASSES, IMAGE_SIZE
from cells.errors import BadInput
from cells.stain import StainStats, stain_stats
from train.data import list_samples, load_cell, load_cells


def preview(data_dir: Path, out: Path, per_class: int = 8, seed: int = 0) -> Path:
    """One row of random cells per class, labelled, like the tutorial's first figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = list_samples(data_dir)
    rng = random.Random(seed)
    figure, axes = plt.subplots(len(CLASSES), per_class, figsize=(per_class * 1.4, len(CLASSES) * 1.6))
    axes = np.atleast_2d(axes)
    for row, name in enumerate(CLASSES):
        members = [s for s in samples if s.label == row]
        for col in range(per_class):
            axis = axes[row, col]
            axis.axis("off")
            if col < len(members):
                sample = members[rng.randrange(len(members))]
                try:
                    axis.imshow(load_cell(sample.path))
                except Exception:  # noqa: BLE001 - an unreadable file leaves its tile blank
                    continue
                axis.set_title(f"{name}\n{sample.patient}", fontsize=7)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def stats(data_dir: Path) -> dict:
    """Images and patients per class, and the distribution of original crop sizes."""
    samples = list_samples(data_dir)
    sides, unreadable = [], 0
    for sample in samples:
        try:
            with Image.open(sample.path) as image:
                sides.append(max(image.size))
        except Exception:  # noqa: BLE001 - counted, not fatal
            unreadable += 1
    counts = Counter(s.label for s in samples)
    patients = {name: len({s.patient for s in samples if s.label == i}) for i, name in enumerate(CLASSES)}
    sizes = np.array(sides or [0])
    return {
        "images": len(samples),
        "images_per_class": {name: counts.get(i, 0) for i, name in enumerate(CLASSES)},
        "patients": len({s.patient for s in samples}),
        "patients_per_class": patients,
        "unreadable": unreadable,
        "longest_side_px": {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
            "resized_to": IMAGE_SIZE,
        },
    }


def stain_reference(data_dir: Path, patients: set[str] | None = None) -> StainStats:
    """The colour of a typical training patient's cells: per statistic, the median over patients.

    A median of per-patient statistics, not the statistics of all cells pooled: pooled spreads
    include the differences between slides, which per-slide normalisation is there to remove.
    `patients` restricts it to a model's training patients (NIH slides are pink or lavender, so
    the median of the redness depends on which patients are in).
    """
    samples = [s for s in list_samples(data_dir) if patients is None or s.patient in patients]
    if not samples:
        raise BadInput(f"none of the patients asked for have cells in {data_dir}")
    per_patient = []
    for patient in sorted({s.patient for s in samples}):
        cells = load_cells([s for s in samples if s.patient == patient])
        found = stain_stats(cells.images)
        per_patient.append([*found.mean, *found.std])
    median = np.median(np.asarray(per_patient), axis=0).round(2).tolist()
    return StainStats(mean=tuple(median[:3]), std=tuple(median[3:]))
