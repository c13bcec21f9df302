"""The inspection service: a FastAPI app with the JSON API and the inspection web page.

Endpoints:

``POST /v1/predict``  multipart, one or more images in the repeatable field ``files``; per image
    the raw score, normalised score, threshold, verdict and the anomaly heatmap (base64 RGBA PNG
    at the model's input size; ``?overlay=true`` adds the heatmap blended into the image,
    ``?heatmap=false`` leaves both out); with a class + state classifier (``classifier=``,
    ``flawscope serve --classifier``) also its label, class, state and probability.
``GET /v1/model``     model type, input size, threshold rule, normalisation, training summary
    (and the classifier's labels, input size and runtime).
``GET /healthz``      liveness.
``GET /``             the inspection page (``static/``); ``/openapi.json``; ``/docs``: Swagger UI,
    its files served from ``/docs/assets`` (works offline; no ``/redoc``).

Errors are JSON ``{"detail": "...", "file": "<upload name>"}``: 413 request larger than
``max_upload_bytes`` or more than ``max_files`` files; 415 not an image; 422 empty, truncated
or corrupt image, or more than ``max_pixels`` pixels (checked from the header, before
decoding); 503 when more than ``max_queue`` requests wait. One bad image fails its request
(naming the file); the service keeps serving.

Work (decoding, inference, PNG encoding) runs in a bounded thread pool of ``workers``
threads, so concurrent requests queue instead of competing for memory and cores.

The parts: :mod:`.errors` (refusals), :mod:`.decoding` (uploads), :mod:`.middleware` (body
limits), :mod:`.schemas` (answers), :mod:`.service` (the request logic); this module builds the
app and its routes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from flawscope import __version__
from flawscope.errors import ConfigError
from flawscope.fastruntime import prepare_in_background
from flawscope.pipeline import Inspector
from flawscope.runtime import OnnxInspector, load_any_model
from flawscope.serve.decoding import ALLOWED_FORMATS, decode_upload, decode_upload_views
from flawscope.serve.errors import UploadError, error_response
from flawscope.serve.inspections import inspections_router
from flawscope.serve.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MICRO_BATCH,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_WORKERS,
    Limits,
)
from flawscope.serve.middleware import BodySizeLimit
from flawscope.serve.observability import RequestContext
from flawscope.serve.schemas import ErrorResponse, Health, ModelInfo, PredictResponse
from flawscope.serve.security import requirement
from flawscope.serve.service import (
    DEFAULT_TOP_K,
    AnyInspector,
    RecordPlan,
    Service,
    load_classifier_model,
)
from flawscope.station.auth import KeyRing
from flawscope.station.logs import audit_log
from flawscope.station.metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from flawscope.station.recorder import CONTEXT_FIELDS, ModelIdentity, Recorder, clean_context
from flawscope.station.store import RecordStore, Retention, utcnow

if TYPE_CHECKING:
    from flawscope.serve.service import AnyClassifier

__all__ = ["ALLOWED_FORMATS", "BodySizeLimit", "Service", "UploadError", "create_app",
           "decode_upload", "decode_upload_views"]

log = logging.getLogger("flawscope.serve")

STATIC_DIR = Path(__file__).parent / "static"
#: where /docs loads the Swagger UI files from (this service, no CDN: works offline)
DOCS_ASSETS = "/docs/assets"


def _docs_assets_dir() -> Path:
    """The Swagger UI files, as the ``fastapi-offline`` package ships them."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def _validation_message(exc: RequestValidationError) -> str:
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if loc[:2] == ("body", "files") and err.get("type") == "missing":
            return ("no images: send one or more image files as multipart/form-data in the "
                    "repeatable field 'files'")
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    ) or "invalid request"


def create_app(
    model: str | os.PathLike | AnyInspector,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_files: int = DEFAULT_MAX_FILES,
    workers: int = DEFAULT_WORKERS,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    micro_batch: int = DEFAULT_MICRO_BATCH,
    device: str = "auto",
    runtime: str = "auto",
    classifier: str | os.PathLike | AnyClassifier | None = None,
    db: str | os.PathLike | RecordStore | None = None,
    images: str | os.PathLike | None = None,
    keep_goods: float = 0.01,
    retention: Retention | None = None,
    keys: KeyRing | None = None,
) -> FastAPI:
    """The service for ``model`` (a model file, an exported ``.onnx``, or a loaded inspector).

    ``classifier``: a class + state classifier (model file, its ``.onnx`` export or a loaded
    ``Classifier`` / ``OnnxClassifier``) run on every image next to the detector; each result
    then carries ``classification``. None: results and ``/v1/model`` as without it.

    ``max_upload_bytes``: largest request body; ``max_pixels``: largest image (width x height);
    ``max_files``: most images per request; ``workers``: inference threads (default 1: torch
    and onnxruntime already use every core within one call, and concurrent calls on a busy
    CPU slow each other down badly); ``max_queue``: most requests waiting before 503;
    ``max_request_pixels``, ``request_timeout``, ``body_timeout``, ``micro_batch`` (most
    images of concurrent requests scored in one model call; 1: each request alone): see
    :class:`~flawscope.serve.limits.Limits`.

    ``runtime``: what scores a model file's images (:func:`flawscope.fastruntime.
    select_runtime`): ``auto`` = its cached onnxruntime graph; when none is cached yet, the
    service starts in PyTorch, exports the model in the background (once per model file) and
    switches when the graph is ready; ``torch``; ``onnxruntime`` (exported before start).

    ``db``: record every verdict in this database (a path, ``postgresql://...`` URL or an
    open :class:`RecordStore`) before answering, and serve the review API and page; None:
    record nothing. ``images``: the image folder (default next to a SQLite file);
    ``keep_goods``: share of OK images kept (every defect image is); ``retention``: limits on
    kept images, applied at start and hourly. ``keys``: API keys and roles; None: open.
    """
    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels),
                        ("max_files", max_files), ("workers", workers),
                        ("max_queue", max_queue), ("max_request_pixels", max_request_pixels),
                        ("micro_batch", micro_batch)):
        if int(value) < 1:
            raise ConfigError(f"{name}={value}: must be at least 1")
    for name, value in (("request_timeout", request_timeout), ("body_timeout", body_timeout)):
        if not float(value) > 0:
            raise ConfigError(f"{name}={value}: must be a positive number of seconds")
    if not 0 <= float(keep_goods) <= 1:
        raise ConfigError(f"--keep-goods {keep_goods}: must be between 0 and 1")
    inspector = model if isinstance(model, (Inspector, OnnxInspector)) else load_any_model(
        model, device=device, runtime=runtime)
    if runtime == "auto" and isinstance(inspector, Inspector) and not isinstance(
            model, Inspector):
        prepare_in_background(inspector, model)  # requests run in PyTorch until it is ready
    clf = load_classifier_model(classifier, device=device) if isinstance(
        classifier, (str, os.PathLike)) else classifier
    limits = Limits(int(max_upload_bytes), int(max_pixels), int(max_files), int(workers),
                    int(max_queue), int(max_request_pixels), float(request_timeout),
                    float(body_timeout), int(micro_batch))
    keys = keys or KeyRing()
    metrics = ServiceMetrics()
    store = db if isinstance(db, RecordStore) or db is None else RecordStore(db, images)
    recorder = None
    if store is not None:
        identity = ModelIdentity.of(inspector, None if isinstance(model, (Inspector,
                                                                          OnnxInspector))
                                    else model)
        recorder = Recorder(store, identity, keep_goods=float(keep_goods),
                            on_write=metrics.on_write, on_image=metrics.on_image)
    service = Service(inspector, limits, clf)
    metrics.watch_queues(lambda: service.pending,
                         None if recorder is None else lambda: recorder.writer.depth)
    model_label = recorder.model.id[:12] if recorder else inspector.metadata()["model"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pruner = None
        if store is not None and retention is not None and retention.active:
            pruner = asyncio.create_task(_prune_hourly(store, retention))
        yield
        if pruner is not None:
            pruner.cancel()
        service.scheduler.shutdown()
        if recorder is not None:
            recorder.close()  # commits what is queued
        if store is not None and not isinstance(db, RecordStore):
            store.close()

    app = FastAPI(
        title="flawscope inspection service",
        version=__version__,
        description="Anomaly scores, OK/defect verdicts and heatmaps for uploaded images; "
        "every verdict recorded, reviewed by an operator.",
        lifespan=lifespan,
        docs_url=None,  # /docs below loads Swagger UI from this service, not a CDN
        redoc_url=None,  # ReDoc loads its logo from a CDN even when bundled
    )
    app.state.service = service
    app.state.store = store
    app.state.recorder = recorder
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, limit=limits.max_upload_bytes,
                       timeout=limits.body_timeout)
    app.add_middleware(RequestContext, metrics=metrics)  # outermost: ids, logs, metrics
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    inspect_role, review_role = requirement(keys, "inspect"), requirement(keys, "review")
    admin_role, any_role = requirement(keys, "admin"), requirement(keys, None)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_response(exc.status, exc.message, exc.file, exc.index, **headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    errors = {code: {"model": ErrorResponse}
              for code in (401, 403, 408, 413, 415, 422, 503, 504)}

    @app.post("/v1/predict", response_model=PredictResponse, responses=errors,
              dependencies=[Depends(inspect_role)],
              summary="Score images: verdict, scores and heatmap per image")
    async def predict(
        request: Request,
        files: Annotated[list[UploadFile], File(
            description="one or more images (PNG, JPEG, BMP, TIFF, WebP, GIF, PGM/PPM)")],
        heatmap: Annotated[bool, Query(description="include the RGBA heatmap PNG")] = True,
        overlay: Annotated[bool, Query(
            description="include the image blended with the heatmap")] = False,
        min_region_area: Annotated[float | None, Query(
            description="smallest defect region in original-image pixels (default 25)")] = None,
        mm_per_pixel: Annotated[float | None, Query(
            description="scale: adds area_mm2 to every region")] = None,
        min_region_mm2: Annotated[float | None, Query(
            description="smallest defect region in mm^2 (needs mm_per_pixel)")] = None,
        top_k: Annotated[int, Query(
            ge=0, le=1000, description="labels listed in classification.top (with a "
            "classifier)")] = DEFAULT_TOP_K,
        station: Annotated[str | None, Form(description="station id (or X-Station header), "
                                            "recorded")] = None,
        line: Annotated[str | None, Form(description="line id (or X-Line)")] = None,
        camera: Annotated[str | None, Form(description="camera id (or X-Camera)")] = None,
        part_id: Annotated[str | None, Form(description="the part's id (or X-Part-Id), "
                                            "recorded with each image")] = None,
    ) -> dict[str, Any]:
        t_start = time.perf_counter()
        try:
            rule = service.inspector.region_rule(min_region_area, mm_per_pixel, min_region_mm2)
        except ConfigError as exc:
            raise UploadError(422, f"region options: {exc}") from None
        if len(files) > limits.max_files:
            raise UploadError(413, f"{len(files)} files in one request; this service accepts "
                              f"at most {limits.max_files} per request")
        if service.pending >= limits.max_queue:
            raise UploadError(503, f"busy: {service.pending} requests are waiting; retry later")
        uploads = []
        for i, f in enumerate(files):
            name = (f.filename or f"file #{i + 1}")[:255]
            uploads.append((name, await f.read()))
            await f.close()
        request_id = request.state.request_id
        plan = None
        if recorder is not None:
            given = {"station": station, "line": line, "camera": camera, "part_id": part_id}
            for key in CONTEXT_FIELDS:
                if given[key] is None:
                    given[key] = request.headers.get("x-" + key.replace("_", "-"))
            plan = RecordPlan(recorder, request_id, utcnow(), clean_context(given))
        service.pending += 1
        try:
            deadline = time.monotonic() + limits.request_timeout
            work = asyncio.wrap_future(service.scheduler.submit(service.steps(
                uploads, heatmap, overlay, rule, deadline, top_k, plan)))
            try:  # the worker gives up by itself at the deadline (between pieces)
                answer, rows = await asyncio.wait_for(asyncio.shield(work),
                                                      limits.request_timeout + 5)
            except TimeoutError:
                raise UploadError(504, "the request took longer than this service's time "
                                  "limit; send fewer or smaller images") from None
            if recorder is not None:
                latency = round((time.perf_counter() - t_start) * 1000, 3)
                for row in rows:
                    row["latency_ms"] = latency
                try:  # committed before the answer: an acknowledged verdict is recorded
                    ids = await asyncio.wrap_future(recorder.commit(rows))
                except Exception as exc:  # noqa: BLE001 - the client is told, and retries
                    log.error("record write failed, request not answered: %s: %s",
                              type(exc).__name__, exc)
                    raise UploadError(503, "the verdicts could not be recorded (the record "
                                      f"store failed: {type(exc).__name__}); nothing was "
                                      "answered: retry") from None
                for item, record_id in zip(answer["results"], ids):
                    item["record_id"] = record_id
        finally:
            service.pending -= 1
        for item in answer["results"]:
            metrics.verdicts.labels(model_label, item["verdict"]).inc()
        answer["request_id"] = request_id
        return answer

    @app.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(any_role)],
             summary="Model metadata: type, input size, threshold, training data")
    async def model_info() -> dict[str, Any]:
        info = service.model_info()
        info["recording"] = None if recorder is None else {
            "model_id": recorder.model.id, "keep_goods": recorder.keep_goods,
            "database": store.url.get_backend_name()}
        info["auth"] = keys.enabled
        return info

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": service.inspector.metadata()["model"],
                "runtime": service.runtime}

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(any_role)])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    if store is not None:
        app.include_router(inspections_router(store, review=review_role, admin=admin_role,
                                              retention=retention,
                                              keep_goods=float(keep_goods)))

        @app.get("/review", include_in_schema=False)
        async def review_page() -> FileResponse:
            return FileResponse(STATIC_DIR / "review.html",
                                headers={"Cache-Control": "no-cache"})

    app.mount(DOCS_ASSETS, StaticFiles(directory=_docs_assets_dir()), name="docs-assets")
    title = f"{app.title} {__version__}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=title,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    return app


async def _prune_hourly(store: RecordStore, retention: Retention) -> None:
    """Apply the retention limits at start and then every hour (in a thread)."""
    while True:
        try:
            report = await asyncio.to_thread(store.prune, retention)
            if report.records or report.files:
                audit_log.info("retention: %d records released their images, %d files removed",
                               report.records, report.files,
                               extra={"event": "prune", "records": report.records,
                                      "files": report.files, "bytes": report.bytes})
        except Exception as exc:  # noqa: BLE001 - retried at the next hour
            log.error("retention failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(3600)
