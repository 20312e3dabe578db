"""The benchmark subcommands (numbers, not pass/fail): `smearscope bench batch|feed|serve|shutdown|runtimes|storage|
field-model|field-data|compare-runs`."""
from __future__ import annotations

import argparse
from pathlib import Path

from batch.field import FINDERS
from cells.cli import add_command, add_group
from cells.repository import DEFAULT_REPOSITORY


def _bench_serve(args: argparse.Namespace) -> int:
    from bench.serving import ServeBenchOptions, bench_serving

    bench_serving(ServeBenchOptions(repository=args.repository, out=args.out, protocols=tuple(args.protocols),
                                    batches=tuple(args.batches), concurrencies=tuple(args.concurrencies),
                                    images=args.images, threads=args.threads))
    return 0


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    from bench.serving import ServeBenchOptions

    defaults = ServeBenchOptions
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository to serve")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.csv"), help="CSV of the grid (and a .json)")
    parser.add_argument("--protocols", nargs="+", choices=("grpc", "http"), default=list(defaults.protocols), help="protocols")
    parser.add_argument("--batches", type=int, nargs="+", default=list(defaults.batches), help="crops per request")
    parser.add_argument("--concurrencies", type=int, nargs="+", default=list(defaults.concurrencies), help="requests in flight")
    parser.add_argument("--images", type=int, default=defaults.images, help="crops per grid point (batch 1: a quarter)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="server's ONNX Runtime threads (0: one per core)")
    parser.set_defaults(handler=_bench_serve)


def _bench_batch(args: argparse.Namespace) -> int:
    from bench.batch import BenchOptions, bench_batch

    bench_batch(BenchOptions(fields=args.fields, repository=args.repository, out=args.out, max_fields=args.max_fields,
                             threads=args.threads, batch_size=args.batch_size, tutorial_images=args.tutorial_images,
                             finder=args.finder, worker_cpus=args.worker_cpus, runtime=args.runtime,
                             baseline_runtime=args.baseline_runtime))
    return 0


def _configure_batch(parser: argparse.ArgumentParser) -> None:
    from bench.batch import BenchOptions

    defaults = BenchOptions  # the dataclass's field defaults are the flags' defaults
    parser.add_argument("--fields", type=Path, default=Path("tests/fixtures/smears"), help="folder of smear field images")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository to measure")
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch.json"), help="JSON report (and a .md beside it)")
    parser.add_argument("--max-fields", type=int, default=defaults.max_fields, help="fields used, in name order")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="inference threads of the in-process models")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="crops per inference call and request")
    parser.add_argument("--tutorial-images", type=int, default=defaults.tutorial_images,
                        help="images timed through the tutorial's one-image loop (it is slow)")
    parser.add_argument("--finder", choices=FINDERS, default=defaults.finder, help="how the job finds cells")
    parser.add_argument("--worker-cpus", type=float, default=defaults.worker_cpus, help="the job's --worker-cpus")
    parser.add_argument("--runtime", default=defaults.runtime, help="the job's --runtime (its embedded Triton's)")
    parser.add_argument("--baseline-runtime", default=defaults.baseline_runtime,
                        help="run the job again with this --runtime in the same run and report the ratio ('' for none)")
    parser.set_defaults(handler=_bench_batch)


def _bench_shutdown(args: argparse.Namespace) -> int:
    from bench.shutdown import ShutdownBenchOptions, bench_shutdown

    bench_shutdown(ShutdownBenchOptions(fields=args.fields, out=args.out, repeats=args.repeats, cases=tuple(args.cases)))
    return 0


def _configure_shutdown(parser: argparse.ArgumentParser) -> None:
    from bench.shutdown import CASES, ShutdownBenchOptions

    defaults = ShutdownBenchOptions
    parser.add_argument("--fields", type=Path, default=defaults.fields, help="smear fields to upload and to run on")
    parser.add_argument("--out", type=Path, default=defaults.out, help="JSON report")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="runs of each case")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="what to start and stop")
    parser.set_defaults(handler=_bench_shutdown)


def _bench_feed(args: argparse.Namespace) -> int:
    from bench.feed import FeedBenchOptions, bench_feed

    bench_feed(FeedBenchOptions(fields=args.fields, repository=args.repository, out=args.out, distinct=args.distinct,
                                total=args.total, worker_cpus=args.worker_cpus, crops=args.crops))
    return 0


def _configure_feed(parser: argparse.ArgumentParser) -> None:
    from bench.feed import FeedBenchOptions

    defaults = FeedBenchOptions
    parser.add_argument("--fields", type=Path, default=defaults.fields, help="folder of real smear fields (one size)")
    parser.add_argument("--repository", type=Path, default=defaults.repository,
                        help="repository whose configs and detector (recorded on the fields) the stand-ins take")
    parser.add_argument("--out", type=Path, default=defaults.out, help="JSON report")
    parser.add_argument("--distinct", type=int, default=defaults.distinct, help="distinct fields, in name order")
    parser.add_argument("--total", type=int, default=defaults.total, help="fields the job runs: copies of the distinct ones")
    parser.add_argument("--worker-cpus", type=float, default=defaults.worker_cpus, help="the job's --worker-cpus")
    from fields.pipeline import CROP_ENGINES

    parser.add_argument("--crops", choices=CROP_ENGINES, default=defaults.crops,
                        help="the job's --crops (graph: as a GPU host runs the field model)")
    parser.set_defaults(handler=_bench_feed)


def _bench_runtimes(args: argparse.Namespace) -> int:
    from bench.runtimes import RuntimeBenchOptions, bench_runtimes

    bench_runtimes(RuntimeBenchOptions(fields=args.fields, repository=args.repository, out=args.out,
                                       max_fields=args.max_fields, threads=args.threads, batch_size=args.batch_size,
                                       annotations=args.annotations))
    return 0


def _configure_runtimes(parser: argparse.ArgumentParser) -> None:
    from bench.runtimes import RuntimeBenchOptions

    defaults = RuntimeBenchOptions
    parser.add_argument("--fields", type=Path, default=defaults.fields, help="folder of real smear fields")
    parser.add_argument("--repository", type=Path, default=defaults.repository, help="repository whose models are run")
    parser.add_argument("--out", type=Path, default=defaults.out, help="JSON report")
    parser.add_argument("--max-fields", type=int, default=defaults.max_fields, help="fields used, in name order")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="inference threads")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="crops per inference call")
    parser.add_argument("--annotations", type=Path,
                        help="the fields' annotations (IML format): also each classifier file's calls at the served "
                             "threshold on every annotated field of --fields (give it fields the model was not adapted on)")
    parser.set_defaults(handler=_bench_runtimes)


def _bench_storage(args: argparse.Namespace) -> int:
    from bench.storage import StorageBenchOptions, bench_storage

    bench_storage(StorageBenchOptions(fields=args.fields, prefix=args.prefix, max_fields=args.max_fields,
                                      repository=args.repository, out=args.out))
    return 0


def _configure_storage(parser: argparse.ArgumentParser) -> None:
    from bench.storage import StorageBenchOptions

    defaults = StorageBenchOptions
    parser.add_argument("--fields", type=Path, required=True, help="folder of real smear fields")
    parser.add_argument("--prefix", required=True,
                        help="s3://bucket/prefix to upload the fields to and run from (the standard AWS variables name the store)")
    parser.add_argument("--max-fields", type=int, default=defaults.max_fields, help="fields used, in name order")
    parser.add_argument("--repository", type=Path, default=defaults.repository, help="repository the job serves")
    parser.add_argument("--out", type=Path, default=defaults.out, help="JSON report")
    parser.set_defaults(handler=_bench_storage)


def _bench_field_model(args: argparse.Namespace) -> int:
    from bench.field_model import FieldModelBenchOptions, bench_field_model

    bench_field_model(FieldModelBenchOptions(fields=args.fields, repository=args.repository, out=args.out,
                                             max_fields=args.max_fields, clients=tuple(args.clients), runtime=args.runtime))
    return 0


def _configure_field_model(parser: argparse.ArgumentParser) -> None:
    from bench.field_model import FieldModelBenchOptions
    from deploy.commands import add_runtime_flag

    defaults = FieldModelBenchOptions
    parser.add_argument("--fields", type=Path, default=defaults.fields, help="folder of real smear fields")
    parser.add_argument("--repository", type=Path, default=defaults.repository, help="repository the server serves")
    parser.add_argument("--out", type=Path, default=defaults.out, help="JSON report")
    parser.add_argument("--max-fields", type=int, default=defaults.max_fields, help="fields used, in name order")
    parser.add_argument("--clients", type=int, nargs="+", default=list(defaults.clients), help="concurrent clients, one run each")
    add_runtime_flag(parser)
    parser.set_defaults(handler=_bench_field_model)


def _bench_operating_point(args: argparse.Namespace) -> int:
    from bench.operating_point import OperatingPointOptions, bench_operating_point

    bench_operating_point(OperatingPointOptions(annotations=args.annotations, field_images=args.field_images, nih=args.nih,
                                                repository=args.repository, out=args.out, threads=args.threads))
    return 0


def _configure_operating_point(parser: argparse.ArgumentParser) -> None:
    from bench.operating_point import OperatingPointOptions

    defaults = OperatingPointOptions
    parser.add_argument("--annotations", type=Path, required=True, help="the lab's field annotations (IML format)")
    parser.add_argument("--field-images", type=Path, required=True, help="folder of those fields")
    parser.add_argument("--nih", type=Path, required=True, help="NIH cells (Parasitized/, Uninfected/)")
    parser.add_argument("--repository", type=Path, default=defaults.repository,
                        help="repository whose classifier (and its assets/adapt-split.json: validation fields and patients) is used")
    parser.add_argument("--out", type=Path, default=defaults.out, help="JSON report")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="inference threads")
    parser.set_defaults(handler=_bench_operating_point)


def _field_data(args: argparse.Namespace) -> int:
    from bench.batch import field_paths
    from bench.serving import field_input_data

    print(field_input_data(field_paths(args.fields, args.max_fields), args.out, args.url))
    return 0


def _configure_field_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fields", type=Path, default=Path("tests/fixtures/smears"), help="folder of smear fields")
    parser.add_argument("--max-fields", type=int, default=20, help="fields used, in name order")
    parser.add_argument("--out", type=Path, default=Path("runs/field-input-data.json"), help="perf_analyzer input data")
    parser.add_argument("--url", default="localhost:8001", help="the server's gRPC address, for the printed command")
    parser.set_defaults(handler=_field_data)


def _compare_runs(args: argparse.Namespace) -> int:
    from bench.compare import write_comparison

    write_comparison(args.baseline, args.candidate, args.out)
    return 0


def _configure_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", type=Path, required=True, help="a run's output folder (smearscope run --output)")
    parser.add_argument("--candidate", type=Path, required=True, help="another run's output, on the same fields")
    parser.add_argument("--out", type=Path, default=Path("bench/results/compare-runs.json"), help="JSON report")
    parser.set_defaults(handler=_compare_runs)


def register(commands: argparse._SubParsersAction) -> None:
    benches = add_group(commands, "bench", "throughput benchmarks (numbers, not pass/fail)")
    add_command(benches, "batch", "the end-to-end job beside the bare models and the tutorial loop, on real fields",
                _configure_batch)
    add_command(benches, "serve", "embedded Triton: img/s and latency over protocol x batch x concurrency", _configure_serve)
    add_command(benches, "compare-runs", "two runs of the job on the same fields: cells F1, calls and counts agreeing",
                _configure_compare)
    add_command(benches, "field-model", "the field model under 1 and 8 concurrent clients: fields per call, crops per classifier call",
                _configure_field_model)
    add_command(benches, "operating-point", "each served form of the classifier (FP32, QDQ INT8, NNCF INT8) at the published threshold",
                _configure_operating_point)
    add_command(benches, "field-data", "perf_analyzer input data for the field model (fields as stored), and its command",
                _configure_field_data)
    add_command(benches, "feed", "the pipeline around the models: the job with stand-in models, core-ms per cell",
                _configure_feed)
    add_command(benches, "shutdown", "seconds from SIGTERM to exit: serve, web and run, started in the background",
                _configure_shutdown)
    add_command(benches, "runtimes", "ONNX Runtime against OpenVINO on this CPU, both models, speed and agreement",
                _configure_runtimes)
    add_command(benches, "storage", "the job on fields in S3 against the same fields on local disk; S3 libraries side by side",
                _configure_storage)
