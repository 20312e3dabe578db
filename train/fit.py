"""The training loop: tf.data with augmentation, Adam, per-epoch checkpoints and resume."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cells.contract import CLASSES, write_labels
from train.data import CellSet, list_samples, load_cells, split_samples
from train.evaluate import keras_predictor, write_evaluation
from train.model import build_model
from train.plots import plot_curves

CHECKPOINT = "checkpoint.keras"
BEST = "best.keras"
STATE = "state.json"


@dataclasses.dataclass
class TrainConfig:
    data: Path
    out: Path
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-5
    warmup_epochs: int = 1
    split: str = "patient"
    val_fraction: float = 0.3
    seed: int = 42
    weights: str = "none"
    class_weight: bool = True
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    resume: bool = False


def augmentation(seed: int) -> keras.Sequential:
    """The tutorial's ImageDataGenerator settings as Keras 3 layers (training pipeline only).

    Filled with black rather than 'nearest', since the NIH crops sit on black backgrounds.
    """
    fill = {"fill_mode": "constant", "fill_value": 0.0}
    return keras.Sequential(
        [
            keras.layers.RandomRotation(20 / 360, seed=seed, **fill),
            keras.layers.RandomZoom(0.05, seed=seed + 1, **fill),
            keras.layers.RandomTranslation(0.05, 0.05, seed=seed + 2, **fill),
            keras.layers.RandomShear(x_factor=0.05, y_factor=0.05, seed=seed + 3, **fill),
            keras.layers.RandomFlip("horizontal", seed=seed + 4),
        ],
        name="augmentation",
    )


def make_dataset(cells: CellSet, batch_size: int, training: bool, seed: int) -> tf.data.Dataset:
    """uint8 crops and one-hot labels; augmented in float, then rounded back to the uint8 contract."""
    onehot = np.eye(len(CLASSES), dtype=np.float32)[cells.labels]
    dataset = tf.data.Dataset.from_tensor_slices((cells.images, onehot)).cache()
    if not training:
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    augment = augmentation(seed)

    def augment_batch(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        moved = augment(tf.cast(images, tf.float32), training=True)
        return tf.cast(tf.clip_by_value(tf.round(moved), 0, 255), tf.uint8), labels

    return (
        dataset.shuffle(len(cells.labels), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


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


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights, normalised to mean 1 over the training images."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    return {i: float(len(labels) / (len(CLASSES) * c)) for i, c in enumerate(counts) if c}


def train(config: TrainConfig) -> dict:
    """Train, checkpoint each epoch, keep the best by validation loss, write every artifact."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))
    samples = list_samples(config.data)
    train_samples, val_samples, split_info = split_samples(samples, config.split, config.val_fraction, config.seed)
    started = time.monotonic()
    train_cells, val_cells = load_cells(train_samples), load_cells(val_samples)
    skipped = train_cells.skipped + val_cells.skipped
    split_info["skipped_files"] = [{"path": p, "reason": r} for p, r in skipped]
    (out / "split.json").write_text(json.dumps(split_info, indent=2))
    print(
        f"data: {len(train_cells.labels)} train / {len(val_cells.labels)} validation images "
        f"({len(split_info['train_patients'])}/{len(split_info['val_patients'])} patients, split={config.split}), "
        f"{len(skipped)} unreadable skipped, decoded in {time.monotonic() - started:.0f}s",
        flush=True,
    )

    epochs_done = 0
    if config.resume and (out / CHECKPOINT).is_file() and (out / STATE).is_file():
        model = keras.models.load_model(out / CHECKPOINT)
        epochs_done = json.loads((out / STATE).read_text())["epochs_done"]
        print(f"resuming after epoch {epochs_done} from {out / CHECKPOINT}", flush=True)
    else:
        model = build_model(config.weights)
        compile_model(model, config.learning_rate)
        (out / "history.csv").unlink(missing_ok=True)

    if epochs_done < config.epochs:
        train_data = make_dataset(train_cells, config.batch_size, training=True, seed=config.seed)
        val_data = make_dataset(val_cells, config.batch_size, training=False, seed=config.seed)
        steps = config.steps_per_epoch or max(1, len(train_cells.labels) // config.batch_size)
        best_kwargs = {}
        if config.resume and (out / STATE).is_file() and (out / "history.csv").is_file():
            previous = np.genfromtxt(out / "history.csv", delimiter=",", names=True)
            best_kwargs["initial_value_threshold"] = float(np.min(np.atleast_1d(previous["val_loss"])))
        model.fit(
            train_data,
            validation_data=val_data,
            epochs=config.epochs,
            initial_epoch=epochs_done,
            steps_per_epoch=steps,
            validation_steps=config.validation_steps,
            class_weight=class_weights(train_cells.labels) if config.class_weight else None,
            verbose=2,
            callbacks=[
                keras.callbacks.LearningRateScheduler(lambda epoch: learning_rate_at(epoch, config)),
                keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
                keras.callbacks.ModelCheckpoint(
                    str(out / BEST), monitor="val_loss", save_best_only=True, **best_kwargs
                ),
                keras.callbacks.ModelCheckpoint(str(out / CHECKPOINT)),
                EpochState(out),
            ],
        )

    history = _read_history(out / "history.csv")
    plot_curves(history, out / "curves.png")
    best = keras.models.load_model(out / BEST) if (out / BEST).is_file() else model
    best.save(out / "model.keras")
    write_labels(out)
    metrics = write_evaluation(keras_predictor(best), val_cells, out, extra={"split": config.split, "epochs": config.epochs})
    print(f"wrote {out}/model.keras; validation accuracy {metrics['accuracy']:.4f}", flush=True)
    return metrics


def _read_history(path: Path) -> dict[str, list[float]]:
    if not path.is_file():
        return {}
    rows = np.genfromtxt(path, delimiter=",", names=True)
    rows = np.atleast_1d(rows)
    return {name: rows[name].tolist() for name in rows.dtype.names}
