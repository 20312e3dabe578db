"""The training stage's subcommands: train, evaluate, soup, remote (pack/fit/import) and data.

Only argparse and the light shared package here; each handler imports Keras when it runs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cells.cli import add_command, add_group
from cells.errors import BadInput
from train.flags import add_augment_flags, augment_settings


def _train(args: argparse.Namespace) -> int:
    if args.dry_run:
        from train.model import build_model

        model = build_model(args.weights)
        model.summary(expand_nested=False)
        print(f"total parameters: {model.count_params():,}")
        return 0
    if args.data is None or args.out is None:
        raise BadInput("--data and --out are required (or use --dry-run)")
    from train.fit import train
    from train.recipe import TrainConfig

    train(
        TrainConfig(
            data=args.data,
            out=args.out,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_epochs=args.warmup_epochs,
            split=args.split,
            val_fraction=args.val_fraction,
            seed=args.seed,
            weights=args.weights,
            class_weight=not args.no_class_weight,
            **augment_settings(args),
            steps_per_epoch=args.steps_per_epoch,
            validation_steps=args.validation_steps,
            resume=args.resume,
        )
    )
    return 0


def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="folder with Parasitized/ and Uninfected/")
    parser.add_argument("--out", type=Path, help="run folder for the model, checkpoints, plots, metrics")
    parser.add_argument("--epochs", type=int, default=30, help="epochs (cosine schedule ends at the last)")
    parser.add_argument("--batch-size", type=int, default=32, help="cells per training step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's peak learning rate")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="epochs of linear warm-up")
    parser.add_argument("--split", choices=("patient", "random"), default="patient", help="how to hold cells out")
    parser.add_argument("--val-fraction", type=float, default=0.3, help="share of patients (or cells) held out")
    parser.add_argument("--seed", type=int, default=42, help="split, initialisation and augmentation")
    parser.add_argument("--weights", default="none", help="none (from scratch), imagenet, or a local weights file")
    parser.add_argument("--no-class-weight", action="store_true", help="do not balance the classes in the loss")
    add_augment_flags(parser)
    parser.add_argument("--steps-per-epoch", type=int, help="cap the steps per epoch (smoke runs)")
    parser.add_argument("--validation-steps", type=int, help="cap the validation steps (smoke runs)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="build the model, print its summary, exit")
    parser.set_defaults(handler=_train)


def _evaluate(args: argparse.Namespace) -> int:
    from train.evaluate import evaluate

    metrics = evaluate(args.model, args.data, args.out)
    keys = ("images", "accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"wrote {args.out}/metrics.json and {args.out}/confusion.png")
    return 0


def _configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="a .keras or .onnx model")
    parser.add_argument("--data", type=Path, required=True, help="folder with Parasitized/ and Uninfected/")
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="folder for metrics.json and confusion.png")
    parser.set_defaults(handler=_evaluate)


def _soup(args: argparse.Namespace) -> int:
    from cells.errors import MissingInput
    from train.soup import soup

    missing = [str(path) for path in args.models if not path.is_file()]
    if missing:
        raise MissingInput(f"model not found: {', '.join(missing)}")
    print(soup(args.models, args.out, args.mix))
    return 0


def _configure_soup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, nargs="+", required=True,
                        help="fine-tunes of one checkpoint (.keras), or the checkpoint itself (.keras or exported .onnx)")
    parser.add_argument("--mix", type=float, nargs="+", help="each model's weight in the average (default: equal)")
    parser.add_argument("--out", type=Path, required=True, help="the averaged .keras model to write")
    parser.set_defaults(handler=_soup)


def _remote_pack(args: argparse.Namespace) -> int:
    from train.recipe import TrainConfig
    from train.remote import pack

    config = TrainConfig(data=args.data, out=args.out, split=args.split, val_fraction=args.val_fraction, seed=args.seed)
    info = pack(args.data, args.out, config, args.quality)
    size = args.out.stat().st_size / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB): {info['train_images']} train / {info['val_images']} val cells")
    return 0


def _remote_fit(args: argparse.Namespace) -> int:
    from train.recipe import TrainConfig
    from train.remote import fit

    config = TrainConfig(
        data=args.pack,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        **augment_settings(args),
    )
    metrics = fit(args.pack, args.out, config, args.budget_s)
    keys = ("accuracy", "sensitivity", "specificity", "roc_auc")
    print(json.dumps({k: metrics[k] for k in keys} | {"epochs": config.epochs}))
    return 0


def _remote_import(args: argparse.Namespace) -> int:
    from train.remote import import_shards

    print(f"wrote {import_shards(args.weights, args.out)}")
    return 0


def _register_remote(steps: argparse._SubParsersAction) -> None:
    def pack(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data", type=Path, required=True, help="folder with Parasitized/ and Uninfected/")
        sub.add_argument("--out", type=Path, required=True, help="the .npz pack to write")
        sub.add_argument("--quality", type=int, default=95, help="WebP quality of the packed crops")
        sub.add_argument("--split", choices=("patient", "random"), default="patient", help="how to hold cells out")
        sub.add_argument("--val-fraction", type=float, default=0.3, help="share of patients (or cells) held out")
        sub.add_argument("--seed", type=int, default=42, help="the split's seed")
        sub.set_defaults(handler=_remote_pack)

    def fit(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--pack", type=Path, required=True, help="the .npz made by `remote pack`")
        sub.add_argument("--out", type=Path, required=True, help="folder for the weight shards and metrics")
        sub.add_argument("--epochs", type=int, default=60, help="at most; fewer if the budget is short")
        sub.add_argument("--budget-s", type=float, default=3600.0, help="wall-clock budget of the whole fit")
        sub.add_argument("--batch-size", type=int, default=64, help="cells per training step")
        sub.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's peak learning rate")
        sub.add_argument("--warmup-epochs", type=int, default=2, help="epochs of linear warm-up")
        sub.add_argument("--seed", type=int, default=42, help="initialisation and augmentation")
        add_augment_flags(sub)
        sub.set_defaults(handler=_remote_fit)

    def import_(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--weights", type=Path, required=True, help="folder with weights-*.npz")
        sub.add_argument("--out", type=Path, required=True, help="the model.keras to write")
        sub.set_defaults(handler=_remote_import)

    add_command(steps, "pack", "here: split, crop and encode the cells into one .npz", pack)
    add_command(steps, "fit", "on the accelerator host: train on a pack (any Keras backend)", fit)
    add_command(steps, "import", "here again: weight shards -> model.keras", import_)


def _data_preview(args: argparse.Namespace) -> int:
    from train.explore import preview

    print(f"wrote {preview(args.data, args.out, per_class=args.per_class, seed=args.seed)}")
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from train.explore import stats

    print(json.dumps(stats(args.data), indent=2))
    return 0


def _data_stain_reference(args: argparse.Namespace) -> int:
    from train.explore import stain_reference

    patients = None
    if args.split:
        split = json.loads(args.split.read_text())
        if "train_patients" not in split:
            raise BadInput(f"{args.split} has no train_patients (expected a run's split.json)")
        patients = set(split["train_patients"])
    reference = stain_reference(args.data, patients)
    print(json.dumps({"cielab_mean": reference.mean, "cielab_std": reference.std}))
    return 0


def _register_data(looks: argparse._SubParsersAction) -> None:
    def preview(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data", type=Path, required=True, help="folder with Parasitized/ and Uninfected/")
        sub.add_argument("--out", type=Path, default=Path("preview.png"), help="the montage PNG to write")
        sub.add_argument("--per-class", type=int, default=8, help="cells shown per class")
        sub.add_argument("--seed", type=int, default=0, help="which cells are drawn")
        sub.set_defaults(handler=_data_preview)

    def stats(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data", type=Path, required=True, help="folder with Parasitized/ and Uninfected/")
        sub.set_defaults(handler=_data_stats)

    def stain_reference(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data", type=Path, required=True, help="folder with Parasitized/ and Uninfected/")
        sub.add_argument("--split", type=Path, help="a run's split.json: use its training patients only")
        sub.set_defaults(handler=_data_stain_reference)

    add_command(looks, "preview", "montage of random cells of each class", preview)
    add_command(looks, "stats", "images per class, patients, sizes", stats)
    add_command(looks, "stain-reference", "median per-patient cell colour (CIELAB), for cells/stain.py", stain_reference)


def _train_detector(args: argparse.Namespace) -> int:
    from train.detector import DetectorConfig, run

    report = run(DetectorConfig(
        fields=args.fields, annotations=args.annotations, out=args.out, folds=args.folds, fold=args.fold,
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, crop=args.crop,
        width=args.width, learning_rate=args.learning_rate, seed=args.seed,
    ))
    print(json.dumps({k: v for k, v in report.items() if k != "folds"}, indent=2))
    return 0


def _configure_train_detector(parser: argparse.ArgumentParser) -> None:
    from train.detector import DetectorConfig as defaults

    parser.add_argument("--fields", type=Path, required=True, help="folder of field images (IML layout)")
    parser.add_argument("--annotations", type=Path, required=True, help="IML annotations.json with per-cell boxes")
    parser.add_argument("--out", type=Path, required=True, help="run folder: fold<k>/ or all/, report.json (reused: resumes)")
    parser.add_argument("--folds", type=int, default=defaults.folds, help="k of k-fold cross-validation by field; 0: train on every field")
    parser.add_argument("--fold", type=int, default=defaults.fold, help="only this fold (-1: all in turn)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per model")
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="crops per batch")
    parser.add_argument("--crop", type=int, default=defaults.crop, help="crop side, px at 1/4 resolution")
    parser.add_argument("--width", type=int, default=defaults.width, help="channels of the U-Net's first level")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="Adam, cosine decay to 0")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="folds and augmentation")
    parser.set_defaults(handler=_train_detector)


def _adapt(args: argparse.Namespace) -> int:
    from train.adapt import adapt
    from train.config import AdaptConfig

    report = adapt(AdaptConfig(
        data=args.data, out=args.out, weights=str(args.model), fields=args.fields, field_images=args.field_images,
        field_val_fraction=args.field_val_fraction, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed, nih_share=args.nih_share,
        infected_share=args.infected_share, stain_normalise=not args.no_stain_normalise,
        trainable_from=args.trainable_from, finder=args.finder, max_false_positive_rate=args.max_false_positive_rate,
        resume=args.resume, evaluate=args.evaluate, **augment_settings(args),
    ))
    print(json.dumps({k: report[k] for k in ("threshold", "operating_point", "rates_at_threshold")}, indent=2))
    return 0


def _configure_adapt(parser: argparse.ArgumentParser) -> None:
    from train.config import STAGES, AdaptConfig as defaults

    parser.add_argument("--data", type=Path, required=True, help="NIH folder with Parasitized/ and Uninfected/ (mixed in)")
    parser.add_argument("--fields", type=Path, required=True, help="the lab's annotations.json (IML format)")
    parser.add_argument("--field-images", type=Path, required=True, help="folder of the annotated field images")
    parser.add_argument("--out", type=Path, required=True, help="run folder: model.keras, decision.json, evaluation.json")
    parser.add_argument("--model", type=Path, default=Path(defaults.weights), help="the classifier to start from (.onnx or .keras)")
    parser.add_argument("--field-val-fraction", type=float, default=defaults.field_val_fraction, help="share of fields held out")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs (cosine schedule ends at the last)")
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="cells per training step")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="Adam's peak learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="splits and augmentation (42: the release's NIH split)")
    parser.add_argument("--nih-share", type=float, default=defaults.nih_share, help="share of each batch drawn from NIH cells")
    parser.add_argument("--infected-share", type=float, default=defaults.infected_share,
                        help="share of the lab's part of a batch drawn from its infected cells")
    parser.add_argument("--no-stain-normalise", action="store_true", help="train on the lab's cells as they are")
    parser.add_argument("--trainable-from", choices=STAGES, default=defaults.trainable_from,
                        help="first backbone stage trained; earlier ones and every batch norm stay frozen")
    parser.add_argument("--finder", choices=("learned", "classical"), default=defaults.finder, help="how fields' cells are found")
    parser.add_argument("--max-false-positive-rate", type=float, default=defaults.max_false_positive_rate,
                        help="operating point: uninfected validation cells the threshold may call Parasitized")
    add_augment_flags(parser)
    parser.set_defaults(rotation=defaults.rotation)
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--evaluate", type=Path, help="no training: score this model (.keras or .onnx, e.g. a soup) "
                        "on the same split and choose its threshold into --out")
    parser.set_defaults(handler=_adapt)


def register(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "train-detector", "the learned red-cell detector: k-fold CV by field, or the release model",
                _configure_train_detector)
    add_command(commands, "train", "train the ResNet50V2 cell classifier", _configure_train)
    add_command(commands, "adapt", "fine-tune the classifier on a lab's annotated fields and choose its threshold",
                _configure_adapt)
    add_command(commands, "evaluate", "metrics and confusion plot of a .keras or .onnx model", _configure_evaluate)
    add_command(commands, "soup", "average the weights of fine-tunes of one checkpoint into one model", _configure_soup)
    _register_remote(add_group(commands, "remote", "train on a borrowed accelerator host (Keras on JAX)"))
    _register_data(add_group(commands, "data", "look at a cell folder"))
