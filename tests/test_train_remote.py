"""The accelerator-host path: pack the split, carry the weights back as shards, import them."""
from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from cells.contract import CLASSES
from train.data import list_samples, load_cells, split_samples
from train.model import build_model
from train.recipe import Augment, StainJitter, TrainConfig
from train.remote import affordable_epochs, import_shards, load_shards, pack, read_pack, save_shards


def test_pack_keeps_the_patient_split_and_the_crops(cells_dir, tmp_path):
    config = TrainConfig(data=cells_dir, out=tmp_path)
    info = pack(cells_dir, tmp_path / "cells.npz", config)
    train, val, stored = read_pack(tmp_path / "cells.npz")

    assert stored == json.loads(json.dumps(info))
    assert not set(train.patients) & set(val.patients)
    _, val_samples, _ = split_samples(list_samples(cells_dir), "patient", config.val_fraction, config.seed)
    originals = load_cells(val_samples)
    assert val.paths == [str(Path(p).relative_to(cells_dir)) for p in originals.paths]
    assert np.array_equal(val.labels, originals.labels)
    assert val.images.shape == originals.images.shape and val.images.dtype == np.uint8
    error = np.abs(val.images.astype(np.int16) - originals.images.astype(np.int16))
    assert error.mean() < 2.0, "WebP quality 95 should move pixels by about one level"


def test_shards_round_trip_within_float16(tmp_path):
    keras.utils.set_random_seed(1)
    trained = build_model("none")
    paths = save_shards(trained, tmp_path, shard_bytes=8 * 2**20)
    assert len(paths) > 1 and all(p.stat().st_size < 16 * 2**20 for p in paths)

    import_shards(tmp_path, tmp_path / "model.keras")
    imported = keras.models.load_model(tmp_path / "model.keras", compile=False)
    for original, restored in zip(trained.get_weights(), imported.get_weights()):
        assert np.allclose(original, restored, rtol=1e-3, atol=1e-4)


def test_shards_from_another_architecture_are_refused(tmp_path):
    inputs = keras.Input((4,))
    small = keras.Model(inputs, keras.layers.Dense(len(CLASSES))(inputs))
    save_shards(small, tmp_path)
    with pytest.raises(ValueError, match="weights in the shards"):
        load_shards(build_model("none"), tmp_path)


@pytest.mark.parametrize("moves", [{}, {"rotation": 180, "channel_gain": 0.25, "desaturate": 0.8}], ids=["tutorial", "wider"])
def test_augment_keeps_the_uint8_contract_and_is_identity_at_inference(cells_dir, tmp_path, moves):
    images = load_cells(list_samples(cells_dir)[:4]).images
    augment = Augment(TrainConfig(data=cells_dir, out=tmp_path, seed=0, **moves))
    moved = keras.ops.convert_to_numpy(augment(images, training=True))
    assert moved.dtype == np.uint8 and moved.shape == images.shape
    assert not np.array_equal(moved, images)
    assert np.array_equal(keras.ops.convert_to_numpy(augment(images, training=False)), images)


@pytest.mark.parametrize(
    ("per_epoch_s", "left_s", "expected"), [(10.0, 300.0, 32), (1.0, 300.0, 60), (1000.0, 300.0, 2), (10.0, -5.0, 2)]
)
def test_epoch_count_fits_the_time_left(per_epoch_s, left_s, expected):
    assert affordable_epochs(2, per_epoch_s, left_s, cap=60) == expected


def test_stain_jitter_moves_cell_colour_and_keeps_the_black_background(cells_dir):
    images = load_cells(list_samples(cells_dir)[:8]).images.astype(np.float32)
    jitter = StainJitter(channel_gain=0.25, desaturate=0.8, seed=0)
    moved = keras.ops.convert_to_numpy(jitter(images, training=True))
    background = images.max(axis=-1) == 0
    assert background.any() and np.all(moved[background] == 0)
    before, after = images[~background], moved[~background]
    assert np.abs(after - before).mean() > 3, "colour barely moved"
    channel_spread = [np.ptp(pixels, axis=-1).mean() for pixels in (before, after)]
    assert channel_spread[1] < channel_spread[0], "the blend toward grey should lower saturation on average"
    assert np.array_equal(keras.ops.convert_to_numpy(jitter(images, training=False)), images)
