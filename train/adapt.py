"""`smearscope adapt`: fine-tune a released classifier on a lab's annotated fields, mixed with NIH
cells so that what it knew holds, and choose its decision threshold on the lab's validation fields.

Every training batch is drawn from three streams: NIH training patients' cells (`nih_share` of
the batch), the lab's infected cells and its uninfected ones. Infected cells are about 1.5 % of a
lab's cells, so they are sampled to `infected_share` of the lab's part rather than weighted in
the loss: every batch then holds some, and the loss stays a plain cross-entropy. The backbone up
to `trainable_from` and every batch norm stay frozen (few lab cells; the imported model's batch
norms are folded, see train/from_onnx.py). The run folder gets model.keras, decision.json (the
threshold with its validation curve, cells.decision), evaluation.json (both domains, before and
after) and the split.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cells.contract import PARASITIZED
from cells.decision import DECISION_FILE, Decision, choose_threshold
from cells.errors import BadInput
from cells.repository import DEFAULT_REPOSITORY
from cells.stats import count_agreement, wilson_interval
from train.data import list_samples, load_cells, split_samples
from train.evaluate import keras_predictor, load_predictor
from train.fields import FieldCells, load_field_cells, split_fields
from train.fit import fit_with_checkpoints
from train.metrics import classification_metrics
from train.config import AdaptConfig, TrainConfig
from train.recipe import Augment, one_hot

def start_model(weights: str, trainable_from: str) -> keras.Model:
    """The model to fine-tune (an exported .onnx or a .keras file), frozen below `trainable_from`."""
    from train.from_onnx import load_model

    path = Path(weights)
    if not path.is_file():
        raise BadInput(f"model to adapt not found: {path}")
    model = load_model(path)
    trainable = trainable_from == "conv1"
    for layer in model.get_layer("resnet50v2").layers:
        trainable = trainable or layer.name.startswith(trainable_from + "_")
        layer.trainable = trainable and not isinstance(layer, keras.layers.BatchNormalization)
    return model


def mixed_dataset(parts: list[tuple[np.ndarray, np.ndarray]], weights: list[float], config: TrainConfig) -> tf.data.Dataset:
    """Endless augmented batches drawn from each (images, labels) part with the given probabilities."""
    streams = [
        tf.data.Dataset.from_tensor_slices((images, one_hot(labels)))
        .shuffle(len(labels), seed=config.seed + i, reshuffle_each_iteration=True)
        .repeat()
        for i, (images, labels) in enumerate(parts)
    ]
    augment = Augment(config)
    return (
        tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=config.seed)
        .batch(config.batch_size, drop_remainder=True)
        .map(lambda images, labels: (augment(images, training=True), labels), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def field_finder(finder: str):
    """The finder the batch job would use, run in-process."""
    if finder == "learned":
        from cells.detect import onnx_finder

        return onnx_finder(DEFAULT_REPOSITORY, keep_border=False)
    from cells.find import find_cells

    return find_cells


def lab_metrics(labels: np.ndarray, p_parasitized: np.ndarray, fields: list[str], threshold: float) -> dict:
    """The lab's cells at a threshold: infected called Parasitized, uninfected called Parasitized
    (each with its Wilson 95 % interval), ROC AUC, and per-field parasitemia against the annotated."""
    from train.metrics import roc_auc

    infected = labels == PARASITIZED
    called = p_parasitized >= threshold
    tp, fp = int((called & infected).sum()), int((called & ~infected).sum())
    n_inf, n_uninf = int(infected.sum()), int((~infected).sum())
    per_field = {}
    for name in sorted(set(fields)):
        rows = np.array([f == name for f in fields])
        per_field[name] = {"cells": int(rows.sum()), "annotated_pct": round(100 * infected[rows].mean(), 3),
                           "called_pct": round(100 * called[rows].mean(), 3)}
    return {
        "threshold": threshold,
        "infected": n_inf, "infected_called_parasitized": tp / n_inf if n_inf else None,
        "infected_ci95": wilson_interval(tp, n_inf),
        "uninfected": n_uninf, "uninfected_called_parasitized": fp / n_uninf if n_uninf else None,
        "uninfected_ci95": wilson_interval(fp, n_uninf),
        "roc_auc": roc_auc(infected, p_parasitized),
        "within_25_percent": count_agreement([(f["annotated_pct"], f["called_pct"]) for f in per_field.values()]),
        "fields_without_parasites_called_any": sum(1 for f in per_field.values() if f["annotated_pct"] == 0 and f["called_pct"] > 0),
        "per_field": per_field,
    }


def cross_fitted(labels: np.ndarray, p: np.ndarray, fields: list[str], budget: float, seed: int) -> dict | None:
    """The threshold chosen on one half of the validation fields, scored on the other, both ways:
    how much choosing the threshold on the fields it is reported on flatters the numbers. None
    with fewer than two validation fields."""
    names = sorted(set(fields))
    if len(names) < 2:
        return None
    np.random.default_rng(seed).shuffle(names)
    halves = [set(names[::2]), set(names[1::2])]
    result = []
    for choose, score in (halves, halves[::-1]):
        pick = np.array([f in choose for f in fields])
        rest = np.array([f in score for f in fields])
        threshold = choose_threshold(labels[pick], p[pick], budget)
        metrics = lab_metrics(labels[rest], p[rest], [f for f in fields if f in score], threshold)
        result.append({k: metrics[k] for k in ("threshold", "infected", "infected_called_parasitized",
                                               "uninfected", "uninfected_called_parasitized")})
    return {"halves": result}


def both_domains(predict, lab: FieldCells, nih) -> tuple[np.ndarray, np.ndarray]:
    """One model's probabilities for the lab's validation cells and the NIH validation patients."""
    return predict(lab.images), predict(nih.images)


def domain_metrics(p_lab: np.ndarray, p_nih: np.ndarray, lab: FieldCells, nih, threshold: float) -> dict:
    """The lab's cells at `threshold`; the NIH patients at the argmax and at `threshold`."""
    nih_metrics = classification_metrics(nih.labels, p_nih, nih.patients)
    at_threshold = (p_nih[:, PARASITIZED] >= threshold) == (nih.labels == PARASITIZED)
    return {
        "lab": lab_metrics(lab.labels, p_lab[:, PARASITIZED], lab.fields, threshold),
        "nih": {k: nih_metrics[k] for k in ("images", "accuracy", "sensitivity", "specificity", "roc_auc")}
        | {"accuracy_at_threshold": float(at_threshold.mean())},
    }


def write_predictions(path: Path, cells: FieldCells, p_parasitized: np.ndarray) -> None:
    """One row per validation cell of the lab: field, annotated type, p(parasitized); for choosing
    an operating point afterwards without running the model again."""
    rows = ["field,kind,p_parasitized"] + [f"{f},{k},{p:.6g}" for f, k, p in zip(cells.fields, cells.kinds, p_parasitized)]
    path.write_text("\n".join(rows) + "\n")


def fine_tune(config: AdaptConfig, nih_train, lab_train: FieldCells) -> keras.Model:
    """The mixed-batch fine-tune (module docstring), checkpointed in `config.out`."""
    infected = lab_train.labels == PARASITIZED
    parts = [(nih_train.images, nih_train.labels), (lab_train.images[infected], lab_train.labels[infected]),
             (lab_train.images[~infected], lab_train.labels[~infected])]
    lab_share = 1.0 - config.nih_share
    weights = [config.nih_share, lab_share * config.infected_share, lab_share * (1.0 - config.infected_share)]
    return fit_with_checkpoints(lambda: start_model(config.weights, config.trainable_from),
                                mixed_dataset(parts, weights, config), None, config.steps_per_epoch or 100, config)


def adapt(config: AdaptConfig) -> dict:
    """Fine-tune (or with `config.evaluate`, take that model as it is), choose the threshold, evaluate
    before and after; returns evaluation.json's content."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))
    started = time.monotonic()
    train_samples, val_samples, nih_split = split_samples(list_samples(config.data), "patient", config.val_fraction,
                                                          config.seed)
    training = config.evaluate is None
    nih_train, nih_val = load_cells(train_samples) if training else None, load_cells(val_samples)
    train_fields, val_fields = split_fields(config.fields, config.field_val_fraction, config.seed)
    lab = load_field_cells(config.fields, config.field_images, field_finder(config.finder), config.stain_normalise)
    lab_train, lab_val = lab.select(train_fields), lab.select(val_fields)
    split = {"nih": {k: nih_split[k] for k in ("train_patients", "val_patients")},
             "train_fields": sorted(set(lab_train.fields)), "val_fields": sorted(set(lab_val.fields)),
             "cells": dict(lab.counts)}
    (out / "split.json").write_text(json.dumps(split, indent=2))
    if not len(lab_val.labels) or not (lab_train.labels == PARASITIZED).any():
        raise BadInput("the annotated fields give no validation cells or no infected training cell")
    print(f"data: NIH {len(train_samples)} train / {len(nih_val.labels)} validation cells; lab "
          f"{len(lab_train.labels)} cells of {len(set(lab_train.fields))} fields "
          f"({int((lab_train.labels == PARASITIZED).sum())} infected) / {len(lab_val.labels)} of "
          f"{len(set(lab_val.fields))} fields; {time.monotonic() - started:.0f}s", flush=True)

    if training:
        model = fine_tune(config, nih_train, lab_train)
        model.save(out / "model.keras")
        predictor = keras_predictor(model)
    else:
        predictor = load_predictor(Path(config.evaluate))
    p_lab, p_nih = both_domains(predictor, lab_val, nih_val)
    write_predictions(out / "val_predictions.csv", lab_val, p_lab[:, PARASITIZED])
    threshold = choose_threshold(lab_val.labels, p_lab[:, PARASITIZED], config.max_false_positive_rate)
    decision = Decision.from_validation(lab_val.labels, p_lab[:, PARASITIZED], threshold,
                                        f"{len(set(lab_val.fields))} validation fields of {Path(config.fields).resolve().parent.name}")
    (out / DECISION_FILE).write_text(json.dumps(decision.to_json(), indent=2))
    before = both_domains(load_predictor(Path(config.weights)), lab_val, nih_val)
    report = {
        "threshold": threshold,
        "operating_point": f"the lowest threshold whose false-positive rate on the validation fields' "
                           f"uninfected cells is at most {config.max_false_positive_rate:.2%}",
        "rates_at_threshold": dataclasses.asdict(decision.rates()),
        "after": domain_metrics(p_lab, p_nih, lab_val, nih_val, threshold),
        "after_at_0.5": domain_metrics(p_lab, p_nih, lab_val, nih_val, 0.5),
        "before_at_0.5": domain_metrics(*before, lab_val, nih_val, 0.5),
        "before_at_its_own_threshold": domain_metrics(  # the released model with only a threshold chosen alike
            *before, lab_val, nih_val,
            choose_threshold(lab_val.labels, before[0][:, PARASITIZED], config.max_false_positive_rate)),
        "threshold_chosen_on_other_half": cross_fitted(lab_val.labels, p_lab[:, PARASITIZED], lab_val.fields,
                                                       config.max_false_positive_rate, config.seed),
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, default=float))
    lab_after, nih_after = report["after"]["lab"], report["after"]["nih"]
    print(f"threshold {threshold:.4f}: lab infected→Parasitized {lab_after['infected_called_parasitized']:.3f}, "
          f"uninfected→Parasitized {lab_after['uninfected_called_parasitized']:.4f}; NIH accuracy "
          f"{nih_after['accuracy']:.4f} (before {report['before_at_0.5']['nih']['accuracy']:.4f}); wrote {out}",
          flush=True)
    return report
