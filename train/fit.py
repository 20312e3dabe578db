"""The training loop: tf.data with augmentation, Adam, per-epoch checkpoints and resume."""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cells.contract import write_labels
from train.data import CellSet, list_samples, load_cells, split_samples
from train.evaluate import keras_predictor, write_evaluation
from train.model import build_model
from train.plots import plot_curves
from train.recipe import STATE, Augment, EpochState, TrainConfig, class_weights, compile_model, learning_rate_at, one_hot, read_history

CHECKPOINT = "checkpoint.keras"
BEST = "best.keras"


def make_dataset(cells: CellSet, config: TrainConfig, training: bool) -> tf.data.Dataset:
    """uint8 crops and one-hot labels, the training ones shuffled, repeated and augmented."""
    batch_size, seed = config.batch_size, config.seed
    dataset = tf.data.Dataset.from_tensor_slices((cells.images, one_hot(cells.labels))).cache()
    if not training:
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    augment = Augment(config)

    def augment_batch(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return augment(images, training=True), labels

    return (
        dataset.shuffle(len(cells.labels), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def train(config: TrainConfig) -> dict:
    """Train, checkpoint each epoch, keep the best by validation loss, write every artifact."""
    samples = list_samples(config.data)  # bad data is refused before anything is written
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))
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

    train_data = make_dataset(train_cells, config, training=True)
    val_data = make_dataset(val_cells, config, training=False)
    steps = config.steps_per_epoch or max(1, len(train_cells.labels) // config.batch_size)
    weights = class_weights(train_cells.labels) if config.class_weight else None
    model = fit_with_checkpoints(lambda: build_model(config.weights), train_data, val_data, steps, config, weights)

    history = read_history(out / "history.csv")
    plot_curves(history, out / "curves.png")
    best = keras.models.load_model(out / BEST) if (out / BEST).is_file() else model
    best.save(out / "model.keras")
    write_labels(out)
    metrics = write_evaluation(keras_predictor(best), val_cells, out, extra={"split": config.split, "epochs": config.epochs})
    print(f"wrote {out}/model.keras; validation accuracy {metrics['accuracy']:.4f}", flush=True)
    return metrics


def fit_with_checkpoints(
    build: Callable[[], keras.Model],
    train_data: tf.data.Dataset,
    val_data: tf.data.Dataset | None,
    steps: int,
    config: TrainConfig,
    class_weight: dict[int, float] | None = None,
) -> keras.Model:
    """Fit `config.epochs` epochs into `config.out`: the learning-rate schedule, history.csv, a
    checkpoint and state.json after every epoch (so `config.resume` continues after the last one)
    and, with validation data, best.keras by validation loss. `build` makes the model when there is
    nothing to resume; it is compiled here. Returns the model after the last epoch."""
    out = Path(config.out)
    epochs_done = 0
    if config.resume and (out / CHECKPOINT).is_file() and (out / STATE).is_file():
        model = keras.models.load_model(out / CHECKPOINT)
        epochs_done = json.loads((out / STATE).read_text())["epochs_done"]
        print(f"resuming after epoch {epochs_done} from {out / CHECKPOINT}", flush=True)
    else:
        model = build()
        compile_model(model, config.learning_rate)
        (out / "history.csv").unlink(missing_ok=True)
    if epochs_done >= config.epochs:
        return model
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda epoch: learning_rate_at(epoch, config)),
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        keras.callbacks.ModelCheckpoint(str(out / CHECKPOINT)),
        EpochState(out),
    ]
    if val_data is not None:
        best_kwargs = {}
        if config.resume and (out / STATE).is_file() and (out / "history.csv").is_file():
            previous = np.genfromtxt(out / "history.csv", delimiter=",", names=True)
            best_kwargs["initial_value_threshold"] = float(np.min(np.atleast_1d(previous["val_loss"])))
        callbacks.insert(2, keras.callbacks.ModelCheckpoint(str(out / BEST), monitor="val_loss", save_best_only=True,
                                                            **best_kwargs))
    model.fit(
        train_data,
        validation_data=val_data,
        epochs=config.epochs,
        initial_epoch=epochs_done,
        steps_per_epoch=steps,
        validation_steps=config.validation_steps if val_data is not None else None,
        class_weight=class_weight,
        verbose=2,
        callbacks=callbacks,
    )
    return model
