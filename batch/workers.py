"""The batch job's Ray workers: each holds its own Triton client and takes whole fields end to end.

The driver sends a slide (a path, or an archive member's bytes) and gets back its result rows: tens
of bytes a cell, so neither the crops nor Triton's traffic pass through the driver. A worker killed
mid-slide is restarted by Ray and the slide retried on it (on another node if its node is gone).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from batch.field import FieldSettings
from batch.inputs import Slide
from batch.results import SlideResult, failed
from deploy.client import ClientOptions, RequestTally

WORKER_RETRIES = 2  # a slide whose worker dies this many times more becomes an error row


@dataclass
class Outcome:
    """One slide as a worker finished it; `lost` is set when no server took its cells (not the slide's fault)."""

    result: SlideResult | None
    node_id: str
    node_address: str
    model_version: str = ""
    overlay_png: bytes | None = None
    lost: str = ""
    tally: RequestTally = field(default_factory=RequestTally)


class FieldWorker:
    """A Ray actor (see `start_workers`): an asyncio Triton client opened on first use, kept for every slide."""

    def __init__(self, client_options: ClientOptions, settings: FieldSettings, overlays: bool) -> None:
        import asyncio

        import ray

        self.client_options, self.settings, self.overlays = client_options, settings, overlays
        context = ray.get_runtime_context()
        self.node_id, self.node_address = context.get_node_id(), ray.util.get_node_ip_address()
        self.classifier = None
        self.connecting = asyncio.Lock()

    async def _classifier(self):
        from deploy.client import TritonClassifier

        async with self.connecting:
            if self.classifier is None:
                self.classifier = await TritonClassifier(self.client_options).connect()
        return self.classifier

    async def analyse(self, slide: Slide) -> Outcome:
        from batch.field import analyse_field
        from deploy.client import InferenceRejected, ServersUnavailable

        outcome = Outcome(None, self.node_id, self.node_address)
        try:
            data = slide.data if slide.data is not None else Path(slide.path).read_bytes()
        except OSError as error:
            outcome.result = failed(slide.slide_id, slide.source, f"unreadable file: {error.strerror or error}")
            return outcome
        try:
            classifier = await self._classifier()
            analysed = await analyse_field(data, classifier, self.settings, slide.slide_id, slide.source,
                                           keep_image=self.overlays, tally=outcome.tally)
        except (InferenceRejected, ServersUnavailable) as error:
            outcome.lost = str(error)
            return outcome
        outcome.result, outcome.model_version = analysed.result, classifier.model_version
        if self.overlays and analysed.result.status == "ok":
            outcome.overlay_png = analysed.overlay_png()
        return outcome


def start_workers(client_options: ClientOptions, settings: FieldSettings, overlays: bool, count: int = 0) -> list:
    """`count` FieldWorker actors (0: one per CPU of the cluster), spread over its nodes."""
    import ray

    count = count or max(1, int(ray.cluster_resources().get("CPU", 1)))
    actor = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=WORKER_RETRIES)(FieldWorker)
    return [actor.options(scheduling_strategy="SPREAD").remote(client_options, settings, overlays) for _ in range(count)]
