"""The web page and its API: one smear field per request, through the batch job's own field function.

`POST /api/fields` takes one image (multipart field `file`) and answers its cells and counts as
JSON; `GET /` is the page that uploads to it. The upload is read into memory (bounded by
`max_upload_bytes`, refused before reading when the request says it is larger), analysed by
`batch.field.analyse_field` and dropped: nothing is written to disk by this app, and the file name
is only echoed back as a label.
"""
from __future__ import annotations

import asyncio
import base64
import io
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from batch.field import AnalysedField, analyse_field, field_options, settings_served
from batch.overlay import COLOURS, LINE_WIDTHS
from batch.results import CELL_COLUMNS, FIELD_COLUMNS, count_summary
from fields.slides import CELL_IMAGE_MAX_SIDE, ImageTooLarge, NotAnImage
from cells.contract import CLASSES, IMAGE_SUFFIXES
from cells.decision import NEGATIVE_BELOW, Decision
from deploy.client import FIELD, ClientOptions, InferenceRejected, ServersUnavailable, TritonModel
from web.options import MIB, WebOptions

STATIC = Path(__file__).parent / "static"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file
ACCEPTED_TYPES = ("image/", "application/octet-stream")  # octet-stream: what tools send for an unknown suffix
PREVIEW_QUALITY = 90
DISCLAIMER = ("The classifier learnt P. falciparum on thin-smear cells of the NIH set; its calls are not "
              "validated for clinical use and must be checked by a microscopist.")


class UploadLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before or while it is read."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self.message()}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, limited_receive, send)

    def message(self) -> str:
        return f"upload larger than {(self.max_bytes - MULTIPART_OVERHEAD) / MIB:.0f} MiB"


class FieldQueue:
    """At most `workers` fields analysed at once, at most `max_queued` waiting; beyond that, 503."""

    def __init__(self, workers: int, max_queued: int) -> None:
        self.gate, self.max_queued = asyncio.Semaphore(workers), max_queued
        self.waiting = self.analysing = 0

    @asynccontextmanager
    async def slot(self):
        if self.waiting >= self.max_queued:
            raise HTTPException(503, "busy: too many fields waiting, try again shortly", headers={"Retry-After": "5"})
        self.waiting += 1
        try:
            await self.gate.acquire()
        finally:
            self.waiting -= 1
        self.analysing += 1
        try:
            yield
        finally:
            self.analysing -= 1
            self.gate.release()


def preview_data_url(image) -> str:
    """The decoded field as a JPEG data URL: what the browser shows is exactly what was analysed."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def field_response(analysed: AnalysedField, model: str, model_version: str, preview: bool, decision: Decision) -> dict:
    result = analysed.result
    row, cells = result.table_rows(result.field)  # an uploaded field is a slide of its own
    body = {
        "field": row,
        "cells": cells,
        "counts": count_summary(result.parasitized, result.cells, decision),
        "model": model,
        "model_version": model_version,
    }
    if preview:
        body["image"] = preview_data_url(analysed.image)
    return body


def error_status(analysed: AnalysedField) -> int:
    if isinstance(analysed.error, ImageTooLarge):
        return 413
    if isinstance(analysed.error, NotAnImage):
        return 415
    return 422


def create_app(options: WebOptions) -> FastAPI:
    client_options = ClientOptions(options.triton_urls, protocol=options.protocol)
    state: dict = {}
    queue = FieldQueue(options.workers, options.max_queued)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state["classifier"] = await TritonModel(client_options).connect()
        state["settings"], fallback = await settings_served(options.settings, client_options)
        if fallback:
            print(f"warning: the learned finder is not served ({fallback}): finding cells with the classical finder", flush=True)
        state["field_model"] = None
        if state["settings"].finder == "learned":
            state["field_model"] = await TritonModel(field_options(client_options), contract=FIELD).connect()
        yield
        for model in (state["classifier"], state["field_model"]):
            if model is not None:
                await model.close()

    app = FastAPI(title="smearscope", summary="Malaria thin-smear fields: every red cell found and classified",
                  lifespan=lifespan)
    app.add_middleware(UploadLimit, max_bytes=options.max_upload_bytes + MULTIPART_OVERHEAD)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/health")
    async def health() -> JSONResponse:
        """Whether the app and its Triton answer, and how many fields are being analysed or waiting."""
        classifier: TritonModel = state["classifier"]
        try:
            ready = await asyncio.wait_for(classifier.servers[0].client.is_model_ready(client_options.model), 2.0)
        except Exception:  # noqa: BLE001 - any failure to answer is "not ready"
            ready = False
        body = {"status": "ok" if ready else "triton unavailable", "analysing": queue.analysing,
                "waiting": queue.waiting}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/api/info")
    async def info() -> dict:
        """What the page needs to draw and export results: classes, colours, columns, limits, the model."""
        classifier: TritonModel = state["classifier"]
        return {
            "model": client_options.model, "model_version": classifier.model_version, "classes": list(CLASSES),
            "colours": {label: "#%02x%02x%02x" % colour for label, colour in COLOURS.items()},
            "line_widths": LINE_WIDTHS, "cell_columns": list(CELL_COLUMNS), "field_columns": list(FIELD_COLUMNS),
            "max_upload_bytes": options.max_upload_bytes, "max_pixels": options.settings.max_pixels,
            "cell_image_max_side": CELL_IMAGE_MAX_SIDE, "image_suffixes": sorted(IMAGE_SUFFIXES),
            "finder": state["settings"].finder,
            "threshold": options.decision.threshold, "threshold_validated_on": options.decision.validated_on,
            "decision_rule": options.decision.describe(),
            "negative_below_pct": 100 * NEGATIVE_BELOW,
            "disclaimer": DISCLAIMER,
        }

    @app.post("/api/fields")
    async def analyse(
        file: UploadFile = File(..., description="a smear field image (JPEG, PNG, TIFF, BMP, WebP) or one cell crop"),
        image: bool = Query(False, description="also return the decoded field as a JPEG data URL, for display"),
    ) -> dict:
        """Find, crop and classify every red cell of one field; the same function as the batch job's."""
        content_type = (file.content_type or "").lower()
        if not content_type.startswith(ACCEPTED_TYPES):
            raise HTTPException(415, f"unsupported content type {content_type or 'none'}: upload an image "
                                     f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        data = await file.read()
        name = Path(file.filename or "upload").name[:200]
        try:
            async with queue.slot():
                analysed = await analyse_field(data, state["classifier"], state["settings"], name, "upload",
                                               keep_image=image, field_model=state["field_model"])
        except ServersUnavailable as error:
            raise HTTPException(503, f"classifier unavailable: {error}") from error
        except InferenceRejected as error:
            raise HTTPException(502, f"classifier refused the cells: {error}") from error
        if analysed.error is not None:
            raise HTTPException(error_status(analysed), str(analysed.error))
        return field_response(analysed, client_options.model, state["classifier"].model_version, image,
                              options.decision)

    @app.get("/api/call")
    async def call(parasitized: int = Query(..., ge=0), cells: int = Query(..., ge=0)) -> dict:
        """Parasitemia, its 95 % interval and the call for counts over several fields (the page's total)."""
        if parasitized > cells:
            raise HTTPException(422, "parasitized cannot exceed cells")
        return count_summary(parasitized, cells, options.decision)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
