"""The export stage's subcommands: export (Keras -> gated ONNX -> repository) and build-engine (GPU host)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cells.cli import add_command
from cells.contract import MAX_BATCH_SIZE, MODEL_NAME, OPT_BATCH_SIZE
from cells.errors import BadInput
from cells.repository import DEFAULT_REPOSITORY


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
            int8=args.int8,
            calibration_data=args.calibration_data,
            split=args.split,
            fields=_lab_fields(args),
        )
    )
    return 0


def _add_lab_fields(parser: argparse.ArgumentParser, split: str) -> None:
    """--fields/--field-images: gate INT8 on the served decision over a lab's validation fields."""
    parser.add_argument("--fields", type=Path,
                        help="a lab's field annotations (IML format): also gate each INT8 model on the served decision "
                             f"over the lab's validation fields ({split}, else every annotated field)")
    parser.add_argument("--field-images", type=Path, help="folder of those fields (with --fields)")


def _lab_fields(args: argparse.Namespace) -> tuple[Path, Path] | None:
    if bool(args.fields) != bool(args.field_images):
        raise BadInput("--fields and --field-images go together")
    return (args.fields, args.field_images) if args.fields else None


def configure_export(parser: argparse.ArgumentParser) -> None:
    from export.parity import DEFAULT_PARITY_DATA

    parser.add_argument("--model", type=Path, required=True, help="a trained model.keras")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository to write")
    parser.add_argument("--name", default=MODEL_NAME, help="model name in the repository")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH_SIZE, help="Triton max_batch_size, TensorRT max")
    parser.add_argument("--opt-batch", type=int, default=OPT_BATCH_SIZE, help="TensorRT profile's optimal batch")
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="serve the FP16 ONNX")
    parser.add_argument("--tensorrt", action="store_true", help="also build model.plan (needs TensorRT and a GPU)")
    parser.add_argument("--parity-data", type=Path, default=DEFAULT_PARITY_DATA, help="labelled cells for the parity gate")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="serve an INT8 ONNX to CPUs (static quantisation), gated on validation cells")
    parser.add_argument("--calibration-data", type=Path, help="labelled cells to calibrate and gate INT8 (default: --parity-data)")
    parser.add_argument("--split", type=Path, help="a run's split.json: calibrate on its training patients, gate on its validation ones")
    _add_lab_fields(parser, "the run's split.json")
    parser.set_defaults(handler=_export)


def _quantize(args: argparse.Namespace) -> int:
    from export.pipeline import quantize_repository

    quantize_repository(args.repository, args.name, args.data, args.split, args.work_dir, _lab_fields(args))
    return 0


def _configure_quantize(parser: argparse.ArgumentParser) -> None:
    from export.parity import DEFAULT_PARITY_DATA

    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="an exported repository")
    parser.add_argument("--name", default=MODEL_NAME, help="model name in the repository")
    parser.add_argument("--data", type=Path, default=DEFAULT_PARITY_DATA, help="labelled cells to calibrate and gate on")
    parser.add_argument("--split", type=Path, help="a run's split.json: calibrate on its training patients, gate on its validation ones")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/quantize"), help="folder for the intermediate models")
    _add_lab_fields(parser, "assets/adapt-split.json")
    parser.set_defaults(handler=_quantize)


def _build_engine(args: argparse.Namespace) -> int:
    from export.tensorrt import EngineProfile, build_repository_engine

    profile = EngineProfile(opt_batch=args.opt_batch, max_batch=args.max_batch, fp16=args.fp16)
    metadata, config = build_repository_engine(args.repository, args.name, profile)
    print(f"built model.plan with TensorRT {metadata['tensorrt_version']} on {metadata['gpu']}; wrote {config}")
    return 0


def _configure_build_engine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="repository holding 1/model.onnx")
    parser.add_argument("--name", default=MODEL_NAME, help="model name in the repository")
    parser.add_argument("--opt-batch", type=int, default=OPT_BATCH_SIZE, help="TensorRT profile's optimal batch")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH_SIZE, help="TensorRT profile's and Triton's max batch")
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="build an FP16 engine")
    parser.set_defaults(handler=_build_engine)


def _export_detector(args: argparse.Namespace) -> int:
    from export.detector import export_detector

    report = export_detector(args.model, args.repository, args.parity_data)
    print(json.dumps({k: report[k] for k in ("parameters", "max_abs_diff", "same_cells", "sizes_bytes")}, indent=2))
    return 0


def _configure_export_detector(parser: argparse.ArgumentParser) -> None:
    from export.detector import DEFAULT_PARITY_FIELDS

    parser.add_argument("--model", type=Path, required=True, help="the detector's .keras (smearscope train-detector)")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository to write")
    parser.add_argument("--parity-data", type=Path, default=DEFAULT_PARITY_FIELDS, help="fields for the parity gate")
    parser.set_defaults(handler=_export_detector)


def register(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "export-detector", "the learned red-cell detector into the repository (ONNX, gated)",
                _configure_export_detector)
    add_command(commands, "export", "Keras -> ONNX (-> TensorRT) -> Triton model repository", configure_export)
    add_command(commands, "quantize", "give an exported repository its INT8 CPU model, gated on validation cells",
                _configure_quantize)
    add_command(commands, "build-engine", "on the GPU host: FP16 TensorRT model.plan from the repository's ONNX",
                _configure_build_engine)
