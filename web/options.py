"""The web page's settings, light to import so `smearscope web --help` stays quick."""
from __future__ import annotations

from dataclasses import dataclass, field

from batch.field import FieldSettings
from cells.decision import Decision

MIB = 1 << 20


@dataclass(frozen=True)
class WebOptions:
    """`smearscope web --help` documents each (web/commands.py)."""

    triton_urls: tuple[str, ...]
    protocol: str = "grpc"
    settings: FieldSettings = field(default_factory=FieldSettings)
    decision: Decision = field(default_factory=Decision)  # the threshold in `settings` and its validation
    max_upload_bytes: int = 32 * MIB
    workers: int = 2  # fields analysed at once; more requests wait their turn
    max_queued: int = 32  # requests waiting beyond which the server answers 503 (retry later)
    shutdown_seconds: int = 3  # on a stop signal, how long requests in flight may still take
