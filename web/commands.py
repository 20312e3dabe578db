"""`smearscope web`: the page and its API on one port, over a given or an embedded Triton."""
from __future__ import annotations

import argparse
from pathlib import Path

from batch.commands import add_field_flags, field_settings
from cells.cli import add_command
from cells.contract import MODEL_NAME
from cells.repository import DEFAULT_REPOSITORY
from deploy.commands import add_runtime_flag
from web.options import MIB, WebOptions

DEFAULTS = WebOptions(triton_urls=())


def _web(args: argparse.Namespace) -> int:
    """Serve the page until SIGINT/SIGTERM (however the process was started): requests in flight are
    answered, for at most `--shutdown-seconds`, then the embedded Triton stops."""
    import uvicorn

    from batch.field import decided
    from cells.stopping import Interrupted, StopSignals
    from deploy.server import EmbeddedServer
    from web.app import create_app

    stop = StopSignals().install()  # uvicorn handles signals while it serves, and hands them back after
    urls = tuple(args.triton_url or ())
    server = None if urls else EmbeddedServer(args.repository, threads=args.server_threads, runtime=args.runtime)
    try:
        with stop.raising():
            if server is not None:
                server.start()
                urls = (server.grpc_url if args.protocol == "grpc" else server.http_url,)
                print(f"embedded Triton on {urls[0]} (models of {args.repository})", flush=True)
            settings, decision = decided(field_settings(args), args.repository, MODEL_NAME)
            options = WebOptions(
                triton_urls=urls, protocol=args.protocol, settings=settings, decision=decision,
                max_upload_bytes=int(args.max_upload_mib * MIB), workers=args.workers, max_queued=args.max_queued,
            )
            print(f"smearscope web on http://{args.host}:{args.port}/", flush=True)
        uvicorn.run(create_app(options), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=args.shutdown_seconds)
    except Interrupted:
        pass
    finally:
        if server is not None:
            server.stop()
    return 0


def configure_web(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    parser.add_argument("--port", type=int, default=8080, help="port of the page and API")
    parser.add_argument("--triton-url", nargs="+", help="Triton server(s), host:port; default: start an embedded one")
    parser.add_argument("--protocol", choices=("grpc", "http"), default=DEFAULTS.protocol, help="how to talk to Triton")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository for the embedded Triton, and whose decision.json sets the threshold")
    parser.add_argument("--server-threads", type=int, default=0, help="inference threads of the embedded Triton (0: one per core)")
    add_runtime_flag(parser)
    parser.add_argument("--max-upload-mib", type=float, default=DEFAULTS.max_upload_bytes / MIB, help="larger uploads are refused (413)")
    parser.add_argument("--workers", type=int, default=DEFAULTS.workers, help="fields analysed at once; others wait their turn")
    parser.add_argument("--max-queued", type=int, default=DEFAULTS.max_queued, help="fields waiting beyond which requests get 503")
    parser.add_argument("--shutdown-seconds", type=int, default=DEFAULTS.shutdown_seconds,
                        help="on SIGINT/SIGTERM, how long requests in flight may take before they are cancelled")
    add_field_flags(parser, DEFAULTS.settings)
    parser.set_defaults(handler=_web)


def register(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "web", "the web page: upload smear fields, see every cell, its call and the parasitemia",
                configure_web)
