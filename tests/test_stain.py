"""Per-slide stain normalisation on the crops of real IML fields."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fields.slides import prepare
from cells.detection_eval import load_rgb
from cells.find import cell_crops, find_cells
from cells.stain import BACKGROUND_LEVEL, MIN_CELLS, REFERENCE, normalise_stain, stain_stats
from tests.conftest import run_cli

FIELDS = Path(__file__).parent / "fixtures" / "smears"


def crops_of(field: np.ndarray) -> np.ndarray:
    return cell_crops(field, find_cells(field))


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return load_rgb(FIELDS / "PA171691.JPG")


def test_a_slide_comes_out_with_the_reference_colour_and_a_black_background(field):
    crops = crops_of(field)
    normalised = normalise_stain(crops)

    found = stain_stats(normalised)
    assert np.allclose(found.mean, REFERENCE.mean, atol=1.5), found
    assert np.allclose(found.std, REFERENCE.std, rtol=0.15), found
    assert np.abs(np.subtract(stain_stats(crops).mean, REFERENCE.mean)).max() > 5, "the field should start off-reference"
    background = crops.max(axis=-1) <= BACKGROUND_LEVEL
    assert np.array_equal(normalised[background], crops[background])


def test_a_restained_slide_normalises_to_nearly_the_same_crops(field):
    """The same cells photographed under a bluer, darker stain: normalisation undoes most of it."""
    restained = np.clip(field * np.array([0.75, 0.85, 1.1]), 0, 255).astype(np.uint8)
    original, shifted = crops_of(field), crops_of(restained)
    assert original.shape == shifted.shape
    cells = (original.max(axis=-1) > BACKGROUND_LEVEL) & (shifted.max(axis=-1) > BACKGROUND_LEVEL)

    def gap(first: np.ndarray, second: np.ndarray) -> float:
        return float(np.abs(first.astype(int) - second.astype(int))[cells].mean())

    raw_gap = gap(original, shifted)
    normalised_gap = gap(normalise_stain(original), normalise_stain(shifted))
    assert normalised_gap < raw_gap / 3, (raw_gap, normalised_gap)


def test_darker_cells_stay_darker(field):
    """One transform per slide: what tells one cell from another (a parasite's stain) survives."""
    crops = crops_of(field)
    normalised = normalise_stain(crops)
    cell = crops.max(axis=-1) > BACKGROUND_LEVEL

    def brightness(images: np.ndarray) -> np.ndarray:
        return np.array([image[mask].mean() for image, mask in zip(images.astype(float), cell)])

    before, after = brightness(crops), brightness(normalised)
    assert np.corrcoef(np.argsort(np.argsort(before)), np.argsort(np.argsort(after)))[0, 1] > 0.95


def test_too_few_cells_are_left_as_they_are(field):
    crops = crops_of(field)[: MIN_CELLS - 1]
    assert np.array_equal(normalise_stain(crops), crops)


def test_crops_with_no_cell_pixels_are_left_as_they_are(field):
    dark = (crops_of(field).astype(np.uint16) * BACKGROUND_LEVEL // 255).astype(np.uint8)
    assert np.array_equal(normalise_stain(dark), dark)


def test_the_batch_step_normalises_unless_asked_not_to(field):
    data = (FIELDS / "PA171691.JPG").read_bytes()
    raw = prepare(data, stain_normalise=False)
    assert np.array_equal(raw.crops, crops_of(field))
    assert np.array_equal(prepare(data).crops, normalise_stain(raw.crops))


def test_stain_reference_is_the_median_of_the_chosen_patients(cells_dir, tmp_path):
    """`smearscope data stain-reference`, the command that measured REFERENCE, on the fixture cells."""
    every = run_cli("data", "stain-reference", "--data", str(cells_dir))
    assert every.returncode == 0, every.stderr[-2000:]
    found = json.loads(every.stdout)
    assert 40 < found["cielab_mean"][0] < 90 and all(0 < s < 30 for s in found["cielab_std"])

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train_patients": ["P62"]}))
    one = run_cli("data", "stain-reference", "--data", str(cells_dir), "--split", str(split))
    assert one.returncode == 0 and json.loads(one.stdout) != found, one.stderr[-2000:]

    split.write_text(json.dumps({"train_patients": ["P999"]}))
    none = run_cli("data", "stain-reference", "--data", str(cells_dir), "--split", str(split))
    assert none.returncode == 1 and "none of the patients" in none.stderr

    split.write_text("{}")
    wrong = run_cli("data", "stain-reference", "--data", str(cells_dir), "--split", str(split))
    assert wrong.returncode == 1 and "no train_patients" in wrong.stderr


def _reference_normalise(crops: np.ndarray) -> np.ndarray:
    """The transform written plainly: every cell pixel's CIELAB, moments over pixels, each pixel
    recoloured. The fast path (distinct colours, tables kept between calls) must give the same bytes."""
    from skimage.color import lab2rgb, rgb2lab

    cell = crops.max(axis=-1) > BACKGROUND_LEVEL
    colours, inverse = np.unique(crops[cell], axis=0, return_inverse=True)
    lab = rgb2lab(colours[None].astype(np.float32) / 255.0)[0]
    pixels = lab[inverse.reshape(-1)]
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    lab = (lab - mean) * (np.asarray(REFERENCE.std) / np.maximum(std, 1e-3)) + np.asarray(REFERENCE.mean)
    recoloured = np.clip(np.rint(lab2rgb(lab[None])[0] * 255.0), 0, 255).astype(np.uint8)
    out = crops.copy()
    out[cell] = recoloured[inverse.reshape(-1)]
    return out


def test_normalised_crops_are_the_plain_transform_of_every_pixel(field):
    crops = crops_of(field)
    first = normalise_stain(crops)
    assert np.abs(first.astype(int) - _reference_normalise(crops)).max() <= 1
    assert np.array_equal(normalise_stain(crops[::-1]), first[::-1]), "the kept tables are left clean between calls"
