"""The serving stage's subcommand: `smearscope serve`, a real Triton on the repository's ONNX model."""
from __future__ import annotations

import argparse
from pathlib import Path

from cells.cli import add_command
from cells.repository import DEFAULT_REPOSITORY


def _serve(args: argparse.Namespace) -> int:
    from deploy.embedded import ServeOptions, serve

    serve(
        ServeOptions(
            repository=args.repository,
            names=tuple(args.name or ()),
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            threads=args.threads,
            runtime=args.runtime,
            parent_pid=args.parent_pid,
            crops=args.crops,
        )
    )
    return 0


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    parser.add_argument("--name", nargs="+", help="models to serve (default: every model of the repository)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 exposes the server on every interface")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0: one per core)")
    add_runtime_flag(parser)
    add_crops_flag(parser)
    parser.add_argument("--parent-pid", type=int, help="shut down when this process is no longer our parent")
    parser.set_defaults(handler=_serve)


def add_crops_flag(parser: argparse.ArgumentParser) -> None:
    from fields.pipeline import CROP_ENGINES

    parser.add_argument("--crops", choices=CROP_ENGINES, default="numpy",
                        help="how the field model cuts and stains crops: numpy (faster on a CPU) or the crop graph "
                             "(export/crop_graph.py, the same pixels within one level; what a GPU host runs)")


def add_runtime_flag(parser: argparse.ArgumentParser) -> None:
    from cells.runtime import AUTO, RUNTIMES

    parser.add_argument("--runtime", choices=(AUTO, *RUNTIMES), default=AUTO,
                        help="CPU runtime of the models (auto: for each model, the one measured faster on this kind of CPU)")


def register(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "serve", "a real Triton server (HTTP, gRPC, metrics) on the repository's ONNX model",
                _configure_serve)
