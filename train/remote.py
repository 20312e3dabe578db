"""Train on an accelerator host that has Keras on JAX (or PyTorch) but no TensorFlow and no data folder.

The same recipe as `smearscope train` (train/recipe.py), in three steps:

  pack    (here)   the patient split's crops, made by `crop_cell` and WebP-encoded (quality 95, mean
                   |error| 0.9 of 255), into one .npz (38.4 MiB for all 14,035 cells);
  fit     (there)  the recipe under Keras on JAX, the augmentation outside the jitted step, the epoch
                   count fitted to a time budget once warm-up has timed an epoch; the weights come
                   back as float16 shards under 16 MiB each (the released model is FP16 anyway);
  import  (here)   shards -> model.keras, which `smearscope evaluate` re-scores on the original PNGs
                   and `smearscope export` exports.

    smearscope remote pack --data DIR --out .carry/nih-cells.npz
    train/remote.sh OUT_DIR SECONDS        # on the GPU host: python3 -m smearscope remote fit ...
    smearscope remote import --weights OUT_DIR --out RUN_DIR/model.keras
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from cells.contract import CLASSES
from cells.errors import BadInput
from train.data import CellSet, list_samples, load_cells, split_samples
from train.evaluate import keras_predictor, write_evaluation
from train.model import build_model
from train.recipe import Augment, EpochState, TrainConfig, class_weights, compile_model, learning_rate_at, one_hot

PARTS = ("train", "val")
SHARD_BYTES = 15 * 2**20  # the host returns files of at most 16 MiB
FLOAT16_MAX = 65504.0


def pack(data: Path, out: Path, config: TrainConfig, quality: int = 95) -> dict:
    """Split by the recipe's rule, crop, WebP-encode; returns the split report stored inside."""
    samples = list_samples(data)
    train_samples, val_samples, info = split_samples(samples, config.split, config.val_fraction, config.seed)
    arrays: dict[str, np.ndarray] = {}
    for part, part_samples in zip(PARTS, (train_samples, val_samples)):
        cells = load_cells(part_samples)
        encoded = [_webp(image, quality) for image in cells.images]
        arrays[f"{part}_bytes"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        arrays[f"{part}_offsets"] = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        arrays[f"{part}_labels"] = cells.labels
        arrays[f"{part}_patients"] = np.array(cells.patients)
        arrays[f"{part}_paths"] = np.array([str(Path(p).relative_to(data)) for p in cells.paths])
        info[f"{part}_skipped_files"] = [{"path": p, "reason": r} for p, r in cells.skipped]
    info["webp_quality"] = quality
    arrays["split"] = np.array(json.dumps(info))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return info


def read_pack(path: Path) -> tuple[CellSet, CellSet, dict]:
    """The packed training and validation cells, decoded back to uint8 crops."""
    with np.load(path, allow_pickle=False) as stored:
        sets = [_decode_part(stored, part) for part in PARTS]
        info = json.loads(str(stored["split"]))
    return sets[0], sets[1], info


def _webp(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "WEBP", quality=quality, method=6)
    return buffer.getvalue()


def _decode_part(stored, part: str) -> CellSet:
    data, offsets = stored[f"{part}_bytes"].tobytes(), stored[f"{part}_offsets"]

    def decode(i: int) -> np.ndarray:
        with Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]])) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)

    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(decode, range(len(offsets) - 1)))
    return CellSet(
        images=np.stack(images),
        labels=stored[f"{part}_labels"].astype(np.int32),
        patients=stored[f"{part}_patients"].tolist(),
        paths=stored[f"{part}_paths"].tolist(),
        skipped=[],
    )


def affordable_epochs(done: int, per_epoch_s: float, left_s: float, cap: int) -> int:
    """Epochs in all that fit the time left at the measured pace: at least those done, at most cap."""
    return max(done, min(cap, done + int(left_s // per_epoch_s)))


class FitToBudget(keras.callbacks.Callback):
    """Once warm-up has timed an epoch (compilation excluded), fix the epoch count to what the time
    budget affords, so the cosine schedule still runs to its end; the schedule reads config.epochs."""

    def __init__(self, config: TrainConfig, budget_s: float, reserve_s: float) -> None:
        super().__init__()
        self.config, self.budget_s, self.reserve_s = config, budget_s, reserve_s
        self.started = time.monotonic()
        self.epoch_started = self.started

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.monotonic()
        if epoch + 1 == max(2, self.config.warmup_epochs):
            per_epoch = now - self.epoch_started
            left = self.budget_s - self.reserve_s - (now - self.started)
            self.config.epochs = affordable_epochs(epoch + 1, per_epoch, left, self.config.epochs)
            print(f"{per_epoch:.1f}s per epoch: training {self.config.epochs} epochs", flush=True)
        if epoch + 1 >= self.config.epochs:
            self.model.stop_training = True


class AugmentedBatches(keras.utils.PyDataset):
    """Shuffled training batches, augmented outside the jitted train step, with class weights.

    Measured on an H200 (JAX, batch 64): the train step alone takes 34 ms and the augmentation,
    called eagerly, 97 ms; with the augmentation as a layer inside the jitted step, the first epoch
    (154 steps, compilation included) took 489 s, and the second did not finish in 100 s. Why was
    not established in the time lent; apart, the pieces are known to be fast.
    """

    def __init__(self, cells: CellSet, config: TrainConfig, weights: dict[int, float] | None) -> None:
        super().__init__()
        self.images, self.labels, self.batch_size = cells.images, cells.labels, config.batch_size
        self.augment = Augment(config, name="augment")
        self.rng = np.random.default_rng(config.seed)
        self.order = self.rng.permutation(len(self.labels))
        self.weights = np.array([(weights or {}).get(i, 1.0) for i in range(len(CLASSES))], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images = keras.ops.convert_to_numpy(self.augment(self.images[rows], training=True))
        labels = self.labels[rows]
        return images, one_hot(labels), self.weights[labels]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.labels))


def fit(pack_path: Path, out: Path, config: TrainConfig, budget_s: float, reserve_s: float = 90.0) -> dict:
    """Train the recipe on packed cells; write history, metrics, confusion and weight shards to `out`."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    train_cells, val_cells, info = read_pack(pack_path)
    print(f"{keras.backend.backend()} backend; {len(train_cells.labels)} train / {len(val_cells.labels)} val cells", flush=True)
    model = build_model(config.weights)
    compile_model(model, config.learning_rate)
    weights = class_weights(train_cells.labels) if config.class_weight else None
    model.fit(
        AugmentedBatches(train_cells, config, weights),
        epochs=config.epochs,
        validation_data=(val_cells.images, one_hot(val_cells.labels)),
        validation_batch_size=256,
        verbose=2,
        callbacks=[
            keras.callbacks.LearningRateScheduler(lambda epoch: learning_rate_at(epoch, config)),
            keras.callbacks.CSVLogger(str(out / "history.csv")),
            EpochState(out),
            FitToBudget(config, budget_s, reserve_s),
        ],
    )
    extra = {
        "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "backend": keras.backend.backend(),
        "split": info["split"],
        "train_wall_s": round(time.monotonic() - started, 1),
    }
    metrics = write_evaluation(keras_predictor(model, batch_size=256), val_cells, out, extra=extra)
    save_shards(model, out)
    return metrics


def save_shards(model: keras.Model, out: Path, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Every weight as float16 (float32 where it would overflow), in order, over files < 16 MiB."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for index, weight in enumerate(model.get_weights()):
        fits = weight.dtype.kind == "f" and float(np.max(np.abs(weight), initial=0.0)) < FLOAT16_MAX
        stored = weight.astype(np.float16) if fits else weight
        if size + stored.nbytes > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][f"w{index:05d}"] = stored
        size += stored.nbytes
    paths = [out / f"weights-{i}.npz" for i in range(len(shards))]
    for path, shard in zip(paths, shards):
        np.savez(path, **shard)
    return paths


def load_shards(model: keras.Model, folder: Path) -> None:
    """Set `model`'s weights from save_shards' files, checking count and shapes."""
    stored: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("weights-*.npz")):
        with np.load(path, allow_pickle=False) as shard:
            stored.update({key: shard[key] for key in shard.files})
    current = model.get_weights()
    if len(stored) != len(current):
        raise BadInput(f"{folder}: {len(stored)} weights in the shards, the model has {len(current)}")
    weights = [stored[f"w{i:05d}"].astype(w.dtype) for i, w in enumerate(current)]
    mismatched = [i for i, (w, c) in enumerate(zip(weights, current)) if w.shape != c.shape]
    if mismatched:
        raise BadInput(f"{folder}: weight {mismatched[0]} has shape {weights[mismatched[0]].shape}")
    model.set_weights(weights)


def import_shards(folder: Path, out: Path) -> Path:
    """Shards -> a saved model.keras."""
    model = build_model("none")
    load_shards(model, folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return out
