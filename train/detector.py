"""The learned red-cell detector: a small U-Net on IML fields at 1/4 resolution, trained from boxes.

Targets come from the annotated boxes: the ellipse inscribed in each box is "cell", a Gaussian at
its centre the centre map. IML annotations are incomplete (some fields box a third of their
cells), so the loss ignores what the classical finder sees as a cell where no annotation is: an
unboxed cell is neither taught as background nor as cell. "difficult" boxes are ignored too.

Evaluation is by field: k-fold cross-validation, each fold's model scored on fields it never saw
with the border rule of `cells.detection_eval`. `smearscope train-detector --help`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cells.contract import DETECTOR_INPUT, DETECTOR_MULTIPLE, DETECTOR_OUTPUT, DETECTOR_SCALE
from cells.detection_eval import (
    CELL_TYPES, IGNORED_TYPES, AnnotatedBox, Match, iou_matrix, infected_found, load_annotations, load_rgb, score_field,
)


@dataclass(frozen=True)
class DetectorConfig:
    fields: Path
    annotations: Path
    out: Path
    folds: int = 5  # 0: one model on every field, no held-out fields
    fold: int = -1  # -1: every fold in turn
    epochs: int = 30
    steps_per_epoch: int = 40
    batch_size: int = 8
    crop: int = 128  # px at 1/DETECTOR_SCALE
    width: int = 16  # channels of the first block
    learning_rate: float = 2e-3
    seed: int = 0


def small_field(image: np.ndarray) -> np.ndarray:
    """The field at 1/DETECTOR_SCALE (IML: 1280x960 -> 320x240)."""
    from PIL import Image

    height, width = image.shape[:2]
    size = (round(width / DETECTOR_SCALE), round(height / DETECTOR_SCALE))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def targets(annotated: list[AnnotatedBox], found: list[tuple[int, int, int, int]], shape: tuple[int, int]) -> np.ndarray:
    """[h, w, 3] at 1/DETECTOR_SCALE: cell target, centre target, loss weight."""
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    cell = np.zeros(shape, np.float32)
    centre = np.zeros(shape, np.float32)
    weight = np.ones(shape, np.float32)
    cells = [a.box for a in annotated if a.type in CELL_TYPES]
    for x, y, w, h in cells:
        cx, cy, rx, ry = (x + w / 2) / DETECTOR_SCALE, (y + h / 2) / DETECTOR_SCALE, w / 2 / DETECTOR_SCALE, h / 2 / DETECTOR_SCALE
        inside = ((cols - cx) / (0.9 * rx)) ** 2 + ((rows - cy) / (0.9 * ry)) ** 2 <= 1  # boxes sit ~6 px outside cells
        cell[inside] = 1.0
        sigma = 0.25 * min(rx, ry)
        centre = np.maximum(centre, np.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / (2 * sigma**2)))
    unsure = [a.box for a in annotated if a.type in IGNORED_TYPES]
    unboxed = [box for box, best in zip(found, iou_matrix(found, cells).max(axis=1, initial=0.0)) if best < 0.3]
    for x, y, w, h in unsure + unboxed:
        x0, y0 = int(x / DETECTOR_SCALE), int(y / DETECTOR_SCALE)
        x1, y1 = int(np.ceil((x + w) / DETECTOR_SCALE)), int(np.ceil((y + h) / DETECTOR_SCALE))
        region = weight[y0:y1, x0:x1]
        region[cell[y0:y1, x0:x1] == 0] = 0.0
    return np.stack([cell, centre, weight], axis=-1)


@dataclass
class Fields:
    names: list[str]
    images: list[np.ndarray]  # full resolution, for scoring
    small: np.ndarray  # [n, h, w, 3] uint8 at 1/DETECTOR_SCALE
    maps: np.ndarray  # [n, h, w, 3] float32: targets
    annotations: dict[str, list[AnnotatedBox]]


def load_fields(fields: Path, annotations_path: Path) -> Fields:
    from cells.find import find_cells

    annotations = load_annotations(annotations_path)
    names = sorted(n for n in annotations if (fields / n).is_file())
    images = [load_rgb(fields / n) for n in names]
    small = np.stack([small_field(image) for image in images])
    maps = np.stack([
        targets(annotations[n], [c.box for c in find_cells(image, keep_border=True)], small.shape[1:3])
        for n, image in zip(names, images)
    ])
    return Fields(names, images, small, maps, annotations)


def build_detector(width: int = 16):
    """U-Net, 4 levels: uint8 fields [N, H, W, 3] -> [N, H, W, 2] (cell probability, centre map)."""
    import keras
    from keras import layers

    def block(x, channels):
        for _ in range(2):
            x = layers.Conv2D(channels, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        return x

    inputs = keras.Input((None, None, 3), dtype="uint8", name=DETECTOR_INPUT)
    x = layers.Rescaling(1 / 255.0)(inputs)
    skips = []
    for level in range(4):
        x = block(x, width * 2**level)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = block(x, width * 16)
    for level in reversed(range(4)):
        x = layers.UpSampling2D()(x)
        x = layers.Concatenate()([x, skips[level]])
        x = block(x, width * 2**level)
    outputs = layers.Conv2D(2, 1, activation="sigmoid", name=DETECTOR_OUTPUT)(x)
    return keras.Model(inputs, outputs, name="rbc_detector")


def detector_loss(target, predicted):
    """Weighted BCE on the cell map + weighted, up-scaled squared error on the centre map."""
    import keras.ops as ops

    cell, centre, weight = target[..., 0], target[..., 1], target[..., 2]
    p_cell = ops.clip(predicted[..., 0], 1e-6, 1 - 1e-6)
    bce = -(cell * ops.log(p_cell) + (1 - cell) * ops.log(1 - p_cell))
    squared = ops.square(predicted[..., 1] - centre) * (1 + 9 * centre)  # peaks matter more than the flat rest
    return ops.sum(weight * (bce + 10 * squared)) / (ops.sum(weight) + 1.0)


def augmented_batch(small: np.ndarray, maps: np.ndarray, config: DetectorConfig, rng: np.random.Generator):
    """Random crops with flips, 90° turns, scale and stain/colour jitter."""
    from PIL import Image

    images, labels = [], []
    n, height, width = small.shape[:3]
    for _ in range(config.batch_size):
        index = rng.integers(n)
        side = int(config.crop * rng.uniform(0.8, 1.25))
        side = min(side, height, width)
        y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        image, label = small[index, y : y + side, x : x + side], maps[index, y : y + side, x : x + side]
        if side != config.crop:
            image = np.asarray(Image.fromarray(image).resize((config.crop, config.crop), Image.Resampling.BILINEAR))
            label = np.stack([np.asarray(Image.fromarray(label[..., c]).resize((config.crop, config.crop),
                                                                                Image.Resampling.BILINEAR))
                              for c in range(3)], axis=-1)
            label[..., 2] = label[..., 2] > 0.5
        turns = rng.integers(4)
        image, label = np.rot90(image, turns), np.rot90(label, turns)
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        gain = rng.uniform(0.8, 1.2, size=3) * rng.uniform(0.85, 1.15)
        offset = rng.uniform(-20, 20, size=3)
        image = np.clip(image.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels).astype(np.float32)


def predict_maps(model, small: np.ndarray) -> np.ndarray:
    """Maps of one field at 1/DETECTOR_SCALE, padded to a multiple of 16 and cropped back."""
    height, width = small.shape[:2]
    padded = np.zeros((-(-height // DETECTOR_MULTIPLE) * DETECTOR_MULTIPLE,
                       -(-width // DETECTOR_MULTIPLE) * DETECTOR_MULTIPLE, 3), np.uint8)
    padded[:height, :width] = small
    return np.asarray(model(padded[None], training=False))[0, :height, :width]


def score(model, fields: Fields, indices: list[int]) -> dict:
    """Detection P/R/F1 (border rule), infected cells found and seconds a field, on these fields."""
    from cells.detect import cells_from_maps

    total, infected, seconds = Match(0, 0, 0), np.zeros(2, int), 0.0
    for i in indices:
        image, name = fields.images[i], fields.names[i]
        started = time.perf_counter()
        maps = predict_maps(model, fields.small[i])
        boxes = [c.box for c in cells_from_maps(maps, image.shape[:2], DETECTOR_SCALE, keep_border=True)]
        seconds += time.perf_counter() - started
        total = total + score_field(boxes, fields.annotations[name], image.shape[1], image.shape[0])
        infected += infected_found(boxes, fields.annotations[name])
    return {"fields": len(indices), "tp": total.tp, "fp": total.fp, "fn": total.fn, "precision": round(total.precision, 4),
            "recall": round(total.recall, 4), "f1": round(total.f1, 4), "infected_found": int(infected[0]),
            "infected": int(infected[1]), "seconds_per_field": round(seconds / max(len(indices), 1), 4)}


def fold_indices(count: int, folds: int, seed: int) -> list[list[int]]:
    """Fields split into `folds` disjoint test sets, shuffled once by `seed`."""
    order = np.random.default_rng(seed).permutation(count)
    return [sorted(order[k::folds].tolist()) for k in range(folds)]


def train_one(config: DetectorConfig, fields: Fields, train: list[int], out: Path):
    """Train on `train` fields with a checkpoint per epoch; resumes from `out` if one is there."""
    import keras

    out.mkdir(parents=True, exist_ok=True)
    checkpoint, state_path = out / "checkpoint.keras", out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"epoch": 0, "history": []}
    if checkpoint.is_file() and state["epoch"]:
        model = keras.models.load_model(checkpoint, custom_objects={"detector_loss": detector_loss})
    else:
        keras.utils.set_random_seed(config.seed)
        model = build_detector(config.width)
        schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, config.epochs * config.steps_per_epoch)
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss=detector_loss)
    small, maps = fields.small[train], fields.maps[train]
    for epoch in range(state["epoch"], config.epochs):
        rng = np.random.default_rng([config.seed, epoch])
        started, losses = time.monotonic(), []
        for _ in range(config.steps_per_epoch):
            images, labels = augmented_batch(small, maps, config, rng)
            losses.append(float(model.train_on_batch(images, labels)))
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 5),
                                 "seconds": round(time.monotonic() - started, 1)})
        model.save(checkpoint)
        state_path.write_text(json.dumps(state, indent=1))
        print(f"{out.name}: epoch {epoch + 1}/{config.epochs} loss {np.mean(losses):.4f} "
              f"({time.monotonic() - started:.0f}s)", flush=True)
    model.save(out / "model.keras")
    return model


def run(config: DetectorConfig) -> dict:
    """Cross-validate (`folds` > 0) and/or train the release model (`folds` == 0); writes report.json."""
    fields = load_fields(config.fields, config.annotations)
    config.out.mkdir(parents=True, exist_ok=True)
    report_path = config.out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["config"] = {k: str(v) for k, v in asdict(config).items()}
    if config.folds == 0:
        model = train_one(config, fields, list(range(len(fields.names))), config.out / "all")
        report["all_fields_training_score"] = score(model, fields, list(range(len(fields.names))))
    else:
        splits = fold_indices(len(fields.names), config.folds, config.seed)
        chosen = range(config.folds) if config.fold < 0 else [config.fold]
        folds = report.setdefault("folds", {})
        for k in chosen:
            test = splits[k]
            train = sorted(set(range(len(fields.names))) - set(test))
            model = train_one(config, fields, train, config.out / f"fold{k}")
            folds[str(k)] = {"test_fields": [fields.names[i] for i in test], **score(model, fields, test)}
            report_path.write_text(json.dumps(report, indent=1))
            print(f"fold {k}: {json.dumps({m: folds[str(k)][m] for m in ('precision', 'recall', 'f1')})}", flush=True)
        if len(folds) == config.folds:
            tp, fp, fn = (sum(f[m] for f in folds.values()) for m in ("tp", "fp", "fn"))
            report["cross_validation"] = {
                "tp": tp, "fp": fp, "fn": fn, "precision": round(tp / (tp + fp), 4), "recall": round(tp / (tp + fn), 4),
                "f1": round(2 * tp / (2 * tp + fp + fn), 4),
                "infected_found": sum(f["infected_found"] for f in folds.values()),
                "infected": sum(f["infected"] for f in folds.values()),
                "seconds_per_field": round(float(np.mean([f["seconds_per_field"] for f in folds.values()])), 4),
            }
    report_path.write_text(json.dumps(report, indent=1))
    return report
