"""The benchmark subcommands (numbers, not pass/fail): `smearscope bench serve`."""
from __future__ import annotations

import argparse
from pathlib import Path

from cells.cli import add_command, add_group


def _bench_serve(args: argparse.Namespace) -> int:
    from bench.serving import bench_serving

    bench_serving(args.repository, args.out, images=args.images, in_flight=args.in_flight, threads=args.threads)
    return 0


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository to serve")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.csv"), help="CSV of the results")
    parser.add_argument("--images", type=int, default=512, help="crops sent per measurement")
    parser.add_argument("--in-flight", type=int, default=8, help="requests in flight")
    parser.add_argument("--threads", type=int, default=0, help="server's ONNX Runtime threads (0: one per core)")
    parser.set_defaults(handler=_bench_serve)


def _bench_batch(args: argparse.Namespace) -> int:
    from bench.batch import BenchOptions, bench_batch

    bench_batch(BenchOptions(fields=args.fields, repository=args.repository, out=args.out, max_fields=args.max_fields,
                             threads=args.threads, batch_size=args.batch_size, tutorial_images=args.tutorial_images))
    return 0


def _configure_batch(parser: argparse.ArgumentParser) -> None:
    from bench.batch import BenchOptions

    defaults = BenchOptions  # the dataclass's field defaults are the flags' defaults
    parser.add_argument("--fields", type=Path, default=Path("tests/fixtures/smears"), help="folder of smear field images")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository to measure")
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch.json"), help="JSON report (and a .md beside it)")
    parser.add_argument("--max-fields", type=int, default=defaults.max_fields, help="fields used, in name order")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="inference threads of the in-process models")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="crops per inference call and request")
    parser.add_argument("--tutorial-images", type=int, default=defaults.tutorial_images,
                        help="images timed through the tutorial's one-image loop (it is slow)")
    parser.set_defaults(handler=_bench_batch)


def register(commands: argparse._SubParsersAction) -> None:
    benches = add_group(commands, "bench", "throughput benchmarks (numbers, not pass/fail)")
    add_command(benches, "batch", "the end-to-end job beside the bare models and the tutorial loop, on real fields",
                _configure_batch)
    add_command(benches, "serve", "embedded Triton: req/s and img/s, batch 1 and 64, HTTP and gRPC", _configure_serve)
