"""Reading the published NIH layout, patient ids, the patient-level split and the tf.data pipeline."""
from __future__ import annotations

import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cells.contract import CLASSES, IMAGE_SUFFIXES
from cells.crop import crop_cell
from cells.errors import BadInput

# Infected patients: C<slide>[letters]P<patient>..., e.g. C51AP12thinF -> P12, C37BP2_thinF -> P2.
INFECTED_NAME = re.compile(r"^C\d+[A-Za-z]*P(\d+)")
# Healthy donors: C<slide>... with no P<n>; the slide is the patient, e.g. C1_thinF, C3thin_original.
HEALTHY_NAME = re.compile(r"^C(\d+)")


class DataError(BadInput):
    """A data folder that cannot be used at all (wrong path, missing class folder, no images)."""


def patient_id(filename: str) -> str:
    """Patient of an NIH crop from its file name: 'P12' for infected patients, 'C1' for healthy donors."""
    name = Path(filename).name
    infected = INFECTED_NAME.match(name)
    if infected:
        return f"P{int(infected.group(1))}"
    healthy = HEALTHY_NAME.match(name)
    if healthy:
        return f"C{int(healthy.group(1))}"
    raise BadInput(f"cannot parse a patient id from {name!r}")


@dataclass
class Sample:
    path: Path
    label: int
    patient: str


@dataclass
class CellSet:
    """Decoded, cropped cells in memory: 14k cells at 128x128x3 is about 0.7 GB."""

    images: np.ndarray
    labels: np.ndarray
    patients: list[str]
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def list_samples(data_dir: Path) -> list[Sample]:
    """Every image of the Parasitized/ and Uninfected/ subfolders, with its label and patient."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    samples = []
    for label, name in enumerate(CLASSES):
        class_dir = data_dir / name
        if not class_dir.is_dir():
            raise DataError(f"missing class folder {class_dir} (expected {' and '.join(CLASSES)}/)")
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                samples.append(Sample(path, label, patient_id(path.name)))
    if not samples:
        raise DataError(f"no images in {data_dir}/{{{','.join(CLASSES)}}}")
    return samples


def stratified_split(names: list[str], stratum, val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Split names into train and validation sets, each stratum (True first, then False) split by
    itself, so both sides get some of each; one seeded shuffle serves both strata in turn."""
    groups: dict[bool, list[str]] = {True: [], False: []}
    for name in sorted(names):
        groups[bool(stratum(name))].append(name)
    rng = random.Random(seed)
    train, val = set(), set()
    for members in groups.values():
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        if len(members) > 1:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.update(members[:n_val])
        train.update(members[n_val:])
    return train, val


def split_by_patient(samples: list[Sample], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Patient-level split, stratified: infected (P*) and healthy (C*) patients are split separately."""
    patients = list({s.patient for s in samples})
    return stratified_split(patients, lambda patient: patient.startswith("P"), val_fraction, seed)


def split_samples(
    samples: list[Sample], mode: str, val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], dict]:
    """Train/validation samples and a description of the split for split.json."""
    if mode == "patient":
        train_p, val_p = split_by_patient(samples, val_fraction, seed)
        train = [s for s in samples if s.patient in train_p]
        val = [s for s in samples if s.patient in val_p]
        info = {"train_patients": sorted(train_p), "val_patients": sorted(val_p)}
    elif mode == "random":
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        n_val = round(len(samples) * val_fraction)
        val = [samples[i] for i in sorted(order[:n_val])]
        train = [samples[i] for i in sorted(order[n_val:])]
        info = {"train_patients": sorted({s.patient for s in train}), "val_patients": sorted({s.patient for s in val})}
    else:
        raise BadInput(f"unknown split {mode!r} (patient or random)")
    info.update(
        split=mode,
        val_fraction=val_fraction,
        seed=seed,
        train_images=len(train),
        val_images=len(val),
        train_class_counts=_class_counts(train),
        val_class_counts=_class_counts(val),
    )
    return train, val, info


def _class_counts(samples: list[Sample]) -> dict[str, int]:
    counts = Counter(s.label for s in samples)
    return {name: counts.get(i, 0) for i, name in enumerate(CLASSES)}


def load_cell(path: Path) -> np.ndarray:
    """Decode one file through the shared crop function; raises on anything unreadable."""
    with Image.open(path) as image:
        image.load()
        return crop_cell(image)


def load_cells(samples: list[Sample], workers: int = 8) -> CellSet:
    """Decode and crop in parallel; unreadable files are skipped and reported, never fatal."""

    def attempt(sample: Sample) -> np.ndarray | str:
        try:
            return load_cell(sample.path)
        except Exception as error:  # noqa: BLE001 - any decode failure means skip this file
            return f"{type(error).__name__}: {error}".splitlines()[0]

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(attempt, samples))
    kept = [(s, r) for s, r in zip(samples, results) if isinstance(r, np.ndarray)]
    skipped = [(str(s.path), r) for s, r in zip(samples, results) if isinstance(r, str)]
    if not kept:
        raise DataError(f"none of {len(samples)} images could be read")
    return CellSet(
        images=np.stack([r for _, r in kept]),
        labels=np.array([s.label for s, _ in kept], dtype=np.int32),
        patients=[s.patient for s, _ in kept],
        paths=[str(s.path) for s, _ in kept],
        skipped=skipped,
    )
