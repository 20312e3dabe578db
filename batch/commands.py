"""The batch stage's subcommands: run (the job), evaluate-slides and evaluate-detection."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from batch.field import FINDERS, FieldSettings
from batch.grouping import GROUPS, Grouping, grouping
from batch.driver import BatchOptions
from cells.cli import add_command
from cells.repository import DEFAULT_REPOSITORY
from deploy.client import POLICIES
from deploy.commands import add_crops_flag, add_runtime_flag


def _run(args: argparse.Namespace) -> int:
    from batch.driver import run

    return run(BatchOptions(
        inputs=args.input,
        output=args.output,
        triton_urls=tuple(args.triton_url or ()),
        protocol=args.protocol,
        model=args.model,
        repository=args.repository,
        server_threads=args.server_threads,
        server_runtime=args.runtime,
        server_crops=args.crops,
        batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        max_pending=args.max_pending,
        ray_address=args.ray_address,
        max_bytes=args.max_bytes,
        overlays=args.overlays,
        overwrite=args.overwrite,
        worker_cpus=args.worker_cpus,
        triton_policy=args.triton_policy,
        settings=field_settings(args),
        grouping=grouping(args.group, args.manifest, args.pattern),
        min_cells=args.min_cells,
    ))


def add_field_flags(parser: argparse.ArgumentParser, defaults: FieldSettings) -> None:
    """How each field is read and its cells found (FieldSettings): the batch job and the page share these flags."""
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="larger images are refused")
    parser.add_argument("--finder", choices=FINDERS, default=defaults.finder,
                        help="classical (cells/find.py) or learned (the rbc_detector model in Triton, cells/detect.py)")
    parser.add_argument("--cell-diameter", type=float, default=defaults.cell_diameter,
                        help="a typical red cell across, px (IML fields: 70); other magnifications are rescaled to it")
    parser.add_argument("--keep-border-cells", action="store_true", help="also classify cells cut by the field edge")
    parser.add_argument("--stain-normalise", action=argparse.BooleanOptionalAction, default=defaults.stain_normalise,
                        help="recolour each field's cells to the training data's stain (cells/stain.py)")
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="p(parasitized) from which a cell is called Parasitized (default: the model's decision.json, else 0.5)")


def field_settings(args: argparse.Namespace) -> FieldSettings:
    return FieldSettings(args.max_pixels, args.keep_border_cells, args.stain_normalise, args.finder, args.cell_diameter,
                         args.threshold)


def configure_run(parser: argparse.ArgumentParser) -> None:
    defaults = BatchOptions  # the dataclass's field defaults are the flags' defaults
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders, globs, .zip/.tar/.tar.gz archives, whole-slide images; local, or "
                        "s3://bucket/key, s3://bucket/prefix/ or s3://bucket/prefix/*.jpg (credentials: the standard "
                        "AWS chain; endpoint: AWS_ENDPOINT_URL)")
    parser.add_argument("--output", required=True,
                        help="results folder or s3://bucket/prefix/ (reused: finished slides are skipped)")
    parser.add_argument("--triton-url", nargs="+", help="Triton server(s), host:port; {node}:PORT is the worker's own "
                        "node (a Triton per node); default: start an embedded one")
    parser.add_argument("--triton-policy", choices=POLICIES, default=defaults.triton_policy,
                        help="spread requests over the URLs, or send all to the first that is up (node-local first)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default=defaults.protocol, help="how to talk to Triton")
    parser.add_argument("--model", default=defaults.model, help="model name on the server")
    parser.add_argument("--repository", type=Path, default=defaults.repository, help="model repository for the embedded Triton")
    parser.add_argument("--server-threads", type=int, default=defaults.server_threads,
                        help="inference threads of the embedded Triton (0: one per core)")
    add_runtime_flag(parser)
    add_crops_flag(parser)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="crops per inference request")
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight, help="inference requests in flight")
    parser.add_argument("--max-pending", type=int, default=defaults.max_pending, help="slides in flight (0: two per task slot of the cluster)")
    parser.add_argument("--worker-cpus", type=float, default=defaults.worker_cpus,
                        help="CPUs each slide's Ray task reserves (0.5: two slides a core, one preparing while one is classified)")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    parser.add_argument("--max-bytes", type=int, default=defaults.max_bytes,
                        help="larger files and archive members are refused without being read")
    add_field_flags(parser, FieldSettings())
    parser.add_argument("--group", choices=GROUPS, default=Grouping().mode,
                        help="which fields make a slide: each file, each folder, a --manifest, or a --pattern of the name")
    parser.add_argument("--manifest", type=Path, help="CSV with columns image,slide (for --group manifest)")
    parser.add_argument("--pattern", help="regular expression whose group 'slide' (or first group) names the slide (--group pattern)")
    parser.add_argument("--min-cells", type=int, default=defaults.min_cells,
                        help="a slide's parasitemia counts as enough from this many red cells (WHO: 500-2,000)")
    parser.add_argument("--overlays", action="store_true", help="write overlays/<slide>-<key>.png, boxes coloured by class")
    parser.add_argument("--overwrite", action="store_true", help="redo slides already finished in --output")
    parser.set_defaults(handler=_run)


def _evaluate_slides(args: argparse.Namespace) -> int:
    from batch.evaluate_slides import evaluate_slides

    report = evaluate_slides(args.results, args.annotations)
    print(json.dumps({k: v for k, v in report.items() if k != "per_slide"}, indent=2))
    print(f"wrote {args.results}/evaluation.json")
    return 0


def _configure_evaluate_slides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, required=True, help="the batch job's --output folder")
    parser.add_argument("--annotations", type=Path, required=True, help="IML annotations.json")
    parser.set_defaults(handler=_evaluate_slides)


def _evaluate_detection(args: argparse.Namespace) -> int:
    from cells.detect import onnx_finder
    from cells.detection_eval import print_detection_report

    find = onnx_finder(args.repository, args.threads) if args.finder == "learned" else None
    print_detection_report(args.images, args.annotations, args.margin, find)
    return 0


def _configure_evaluate_detection(parser: argparse.ArgumentParser) -> None:
    from cells.detection_eval import BORDER_MARGIN

    parser.add_argument("--images", type=Path, required=True, help="folder of field images")
    parser.add_argument("--annotations", type=Path, required=True, help="IML annotations.json")
    parser.add_argument("--margin", type=int, default=BORDER_MARGIN, help="boxes this close to the edge are don't-care, px")
    parser.add_argument("--finder", choices=FINDERS, default=FieldSettings().finder, help="which finder to score")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="where the learned detector is")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads for the learned detector (0: one per core)")
    parser.set_defaults(handler=_evaluate_detection)


def register(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "run", "the batch job: smear images -> cells -> Triton -> parasitemia", configure_run)
    add_command(commands, "evaluate-slides", "a batch run against IML-format annotations", _configure_evaluate_slides)
    add_command(commands, "evaluate-detection", "the cell finder on annotated fields: P/R/F1 and error kinds",
                _configure_evaluate_detection)
