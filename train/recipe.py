"""The training recipe, with no TensorFlow in it: the same code trains here and on a borrowed
accelerator host whose Keras runs on JAX or PyTorch (train/remote.py)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import keras
import numpy as np

from cells.contract import CLASSES
from train.config import TrainConfig

STATE = "state.json"

class StainJitter(keras.layers.Layer):
    """Colour moves for stain and microscope differences: per-channel gains, then a blend toward grey.

    Both are multiplicative, so the black background around an NIH crop stays black, and the
    largest blend reaches the grey cells of other labs' fields (the IML fields' cell pixels average
    152,152,152 where the NIH cells average 204,138,150). Float in, float out.
    """

    def __init__(self, channel_gain: float, desaturate: float, seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.channel_gain, self.desaturate = channel_gain, desaturate
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training: bool = True):
        if not training:
            return images
        batch = keras.ops.shape(images)[0]
        log_gain = keras.random.uniform((batch, 1, 1, 3), -self.channel_gain, self.channel_gain, seed=self.seed_generator)
        moved = images * keras.ops.exp(log_gain)
        grey = keras.ops.mean(moved, axis=-1, keepdims=True)
        blend = keras.random.uniform((batch, 1, 1, 1), 0.0, self.desaturate, seed=self.seed_generator)
        return moved + (grey - moved) * blend


class Augment(keras.layers.Layer):
    """The tutorial's ImageDataGenerator settings as Keras 3 layers, uint8 in and uint8 out.

    Filled with black rather than 'nearest', since the NIH crops sit on black backgrounds. Moved
    pixels are rounded back to uint8, so the model always sees its serving contract. One layer for
    both trainers: mapped over tf.data (train/fit.py), called on each batch before the jitted
    train step on an accelerator (train/remote.py). Built from the run's config, whose defaults are
    the tutorial's (rotation up to 20 degrees either way, no colour jitter), so both trainers move
    images the same way for the same config.
    """

    def __init__(self, config: TrainConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        seed = config.seed
        fill = {"fill_mode": "constant", "fill_value": 0.0}
        self.moves = [
            keras.layers.RandomRotation(config.rotation / 360, seed=seed, **fill),
            keras.layers.RandomZoom(0.05, seed=seed + 1, **fill),
            keras.layers.RandomTranslation(0.05, 0.05, seed=seed + 2, **fill),
            keras.layers.RandomShear(x_factor=0.05, y_factor=0.05, seed=seed + 3, **fill),
            keras.layers.RandomFlip("horizontal", seed=seed + 4),
        ]
        if config.channel_gain or config.desaturate:
            self.moves.append(StainJitter(config.channel_gain, config.desaturate, seed=seed + 5))

    def call(self, images, training: bool = True):
        moved = keras.ops.cast(images, "float32")
        for move in self.moves:
            moved = move(moved, training=training)
        return keras.ops.cast(keras.ops.clip(keras.ops.round(moved), 0, 255), "uint8")


def learning_rate_at(epoch: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_learning_rate; a function of the epoch, so resume is exact."""
    if epoch < config.warmup_epochs:
        return config.learning_rate * (epoch + 1) / (config.warmup_epochs + 1)
    span = max(1, config.epochs - config.warmup_epochs)
    progress = min(1.0, (epoch - config.warmup_epochs) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * cosine


class EpochState(keras.callbacks.Callback):
    """Records the finished epoch after the checkpoint is written, so --resume knows where to start."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        (self.out / STATE).write_text(json.dumps({"epochs_done": epoch + 1}))
        logs = logs or {}
        summary = " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items()) if isinstance(v, float))
        print(f"epoch {epoch + 1} done in {time.monotonic() - self.started:.0f}s: {summary}", flush=True)
        self.started = time.monotonic()


def one_hot(labels: np.ndarray) -> np.ndarray:
    """Class indices (CLASSES order) as float32 one-hot rows, the categorical loss's targets."""
    return np.eye(len(CLASSES), dtype=np.float32)[labels]


def compile_model(model: keras.Model, learning_rate: float) -> None:
    """Adam on cross-entropy, the tutorial's optimiser; AUC tracked because the target asks for it."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights, normalised to mean 1 over the training images."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    return {i: float(len(labels) / (len(CLASSES) * c)) for i, c in enumerate(counts) if c}


def read_history(path: Path) -> dict[str, list[float]]:
    """The CSVLogger history as columns; empty when no epoch has finished yet."""
    if not path.is_file():
        return {}
    rows = np.atleast_1d(np.genfromtxt(path, delimiter=",", names=True))
    return {name: rows[name].tolist() for name in rows.dtype.names}
