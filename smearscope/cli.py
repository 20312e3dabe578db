"""The `smearscope` command: one subcommand per stage, each importing its stage only when run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cells.contract import MODEL_NAME
from train.flags import add_augment_flags, augment_settings

# The committed real cells; the export parity gate runs on them unless told otherwise.
DEFAULT_PARITY_DATA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cells"


def _train(args: argparse.Namespace) -> int:
    if args.dry_run:
        from train.model import build_model

        model = build_model(args.weights)
        model.summary(expand_nested=False)
        print(f"total parameters: {model.count_params():,}")
        return 0
    if args.data is None or args.out is None:
        raise ValueError("--data and --out are required (or use --dry-run)")
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


def _evaluate(args: argparse.Namespace) -> int:
    from train.evaluate import evaluate

    metrics = evaluate(args.model, args.data, args.out)
    keys = ("images", "accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"wrote {args.out}/metrics.json and {args.out}/confusion.png")
    return 0


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
            raise ValueError(f"{args.split} has no train_patients (expected a run's split.json)")
        patients = set(split["train_patients"])
    reference = stain_reference(args.data, patients)
    print(json.dumps({"cielab_mean": reference.mean, "cielab_std": reference.std}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from export.pipeline import ExportOptions, export
    from export.triton_config import ServingParameters

    export(
        ExportOptions(
            model=args.model,
            repository=args.repository,
            serving=ServingParameters(name=args.name, max_batch_size=args.max_batch),
            fp16=args.fp16,
            tensorrt=args.tensorrt,
            opt_batch=args.opt_batch,
            parity_data=args.parity_data,
        )
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from deploy.embedded import ServeOptions, serve

    serve(
        ServeOptions(
            repository=args.repository,
            name=args.name,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            threads=args.threads,
            parent_pid=args.parent_pid,
        )
    )
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from bench.serving import bench_serving

    bench_serving(args.repository, args.out, images=args.images, in_flight=args.in_flight, threads=args.threads)
    return 0


def _run(args: argparse.Namespace) -> int:
    from batch.run import run

    return run(args)


def _evaluate_slides(args: argparse.Namespace) -> int:
    from batch.evaluate_slides import evaluate_slides

    report = evaluate_slides(args.results, args.annotations)
    print(json.dumps({k: v for k, v in report.items() if k != "per_slide"}, indent=2))
    print(f"wrote {args.results}/evaluation.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smearscope", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the ResNet50V2 cell classifier")
    train.add_argument("--data", type=Path, help="folder with Parasitized/ and Uninfected/")
    train.add_argument("--out", type=Path, help="run folder for the model, checkpoints, plots, metrics")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--warmup-epochs", type=int, default=1)
    train.add_argument("--split", choices=("patient", "random"), default="patient")
    train.add_argument("--val-fraction", type=float, default=0.3)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--weights", default="none", help="none (from scratch), imagenet, or a local weights file")
    train.add_argument("--no-class-weight", action="store_true", help="do not balance the classes in the loss")
    add_augment_flags(train)
    train.add_argument("--steps-per-epoch", type=int, help="cap the steps per epoch (smoke runs)")
    train.add_argument("--validation-steps", type=int, help="cap the validation steps (smoke runs)")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    train.add_argument("--dry-run", action="store_true", help="build the model, print its summary, exit")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="metrics and confusion plot of a .keras or .onnx model")
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--data", type=Path, required=True, help="folder with Parasitized/ and Uninfected/")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation"))
    evaluate.set_defaults(run=_evaluate)

    export = commands.add_parser("export", help="Keras -> ONNX (-> TensorRT) -> Triton model repository")
    export.add_argument("--model", type=Path, required=True, help="a trained model.keras")
    export.add_argument("--repository", type=Path, default=Path("model_repository"))
    export.add_argument("--name", default=MODEL_NAME)
    export.add_argument("--max-batch", type=int, default=256)
    export.add_argument("--opt-batch", type=int, default=64, help="TensorRT profile's optimal batch")
    export.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="serve the FP16 ONNX")
    export.add_argument("--tensorrt", action="store_true", help="also build model.plan (needs TensorRT and a GPU)")
    export.add_argument("--parity-data", type=Path, default=DEFAULT_PARITY_DATA, help="labelled cells for the parity gate")
    export.set_defaults(run=_export)

    serve = commands.add_parser("serve", help="a real Triton server (HTTP, gRPC, metrics) on the repository's ONNX model")
    serve.add_argument("--repository", type=Path, default=Path("model_repository"))
    serve.add_argument("--name", default=MODEL_NAME)
    serve.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 exposes the server on every interface")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    serve.add_argument("--parent-pid", type=int, help="shut down when this process is no longer our parent")
    serve.set_defaults(run=_serve)

    from batch.run import build_parser as batch_parser

    batch_parser(commands.add_parser("run", help="the batch job: smear images -> cells -> Triton -> parasitemia")).set_defaults(run=_run)

    evaluate_slides = commands.add_parser("evaluate-slides", help="a batch run against IML-format annotations")
    evaluate_slides.add_argument("--results", type=Path, required=True, help="the batch job's --output folder")
    evaluate_slides.add_argument("--annotations", type=Path, required=True, help="IML annotations.json")
    evaluate_slides.set_defaults(run=_evaluate_slides)

    bench = commands.add_parser("bench", help="throughput benchmarks (numbers, not pass/fail)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve = bench_commands.add_parser("serve", help="embedded Triton: req/s and img/s, batch 1 and 64, HTTP and gRPC")
    bench_serve.add_argument("--repository", type=Path, default=Path("model_repository"))
    bench_serve.add_argument("--out", type=Path, default=Path("bench/results/serving.csv"))
    bench_serve.add_argument("--images", type=int, default=512)
    bench_serve.add_argument("--in-flight", type=int, default=8)
    bench_serve.add_argument("--threads", type=int, default=0)
    bench_serve.set_defaults(run=_bench_serve)

    data = commands.add_parser("data", help="look at a cell folder").add_subparsers(dest="data_command", required=True)
    preview = data.add_parser("preview", help="montage of random cells of each class")
    preview.add_argument("--data", type=Path, required=True)
    preview.add_argument("--out", type=Path, default=Path("preview.png"))
    preview.add_argument("--per-class", type=int, default=8)
    preview.add_argument("--seed", type=int, default=0)
    preview.set_defaults(run=_data_preview)
    stats = data.add_parser("stats", help="images per class, patients, sizes")
    stats.add_argument("--data", type=Path, required=True)
    stats.set_defaults(run=_data_stats)
    reference = data.add_parser("stain-reference", help="median per-patient cell colour (CIELAB), for cells/stain.py")
    reference.add_argument("--data", type=Path, required=True)
    reference.add_argument("--split", type=Path, help="a run's split.json: use its training patients only")
    reference.set_defaults(run=_data_stain_reference)
    return parser


# Errors that mean "bad input": reported as one line, never a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"smearscope {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"smearscope {args.command}: interrupted", file=sys.stderr)
        return 130
