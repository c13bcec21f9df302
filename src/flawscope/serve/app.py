"""The inspection service: a FastAPI app with the JSON API and the inspection web page.

Endpoints:

``POST /v1/predict``  multipart, one or more images in the repeatable field ``files``; per image
    the raw score, normalised score, threshold, verdict and the anomaly heatmap (base64 RGBA PNG
    at the model's input size; ``?overlay=true`` adds the heatmap blended into the image,
    ``?heatmap=false`` leaves both out).
``GET /v1/model``     model type, input size, threshold rule, normalisation, training summary.
``GET /healthz``      liveness.
``GET /``             the inspection page (``static/``); ``/docs`` and ``/openapi.json`` as
    FastAPI serves them.

Errors are JSON ``{"detail": "...", "file": "<upload name>"}``: 413 request larger than
``max_upload_bytes`` or more than ``max_files`` files; 415 not an image; 422 empty, truncated
or corrupt image, or more than ``max_pixels`` pixels (checked from the header, before
decoding); 503 when more than ``max_queue`` requests wait. One bad image fails its request
(naming the file); the service keeps serving.

Work (decoding, inference, PNG encoding) runs in a bounded thread pool of ``workers``
threads, so concurrent requests queue instead of competing for memory and cores.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from flawscope import __version__
from flawscope.data.images import convert_channels, pil_to_uint8, resize
from flawscope.errors import ConfigError
from flawscope.export import OnnxInspector, load_any_model, map_scale
from flawscope.pipeline import Inspector
from flawscope.serve.heatmap import COLORMAP, heatmap_png, overlay_png, scale_map
from flawscope.serve.limits import (
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_WORKERS,
    Limits,
)

log = logging.getLogger("flawscope.serve")

STATIC_DIR = Path(__file__).parent / "static"
#: decoders the service accepts (Pillow's plugin names); everything else is refused
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")

AnyInspector = Inspector | OnnxInspector


# ---------------------------------------------------------------------------- errors
class UploadError(Exception):
    """A request the service refuses: HTTP ``status``, a message, the upload's name."""

    def __init__(
        self, status: int, message: str, file: str | None = None, index: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.file = file
        self.index = index


def _error(
    status: int, message: str, file: str | None = None, index: int | None = None,
    **headers: str,
) -> JSONResponse:
    content: dict[str, Any] = {"detail": message}
    if file is not None:
        content["file"] = file
    if index is not None:
        content["index"] = index
    return JSONResponse(content, status_code=status, headers=headers or None)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------- decoding
def decode_upload(
    data: bytes, name: str, *, channels: int, size: tuple[int, int], max_pixels: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Upload bytes -> (uint8 ``H x W x C`` at ``size``, original ``(width, height)``).

    Same conversions as :func:`flawscope.data.images.read_image`, so a file scores the same
    through the service as through ``flawscope predict``. Raises :class:`UploadError`.
    """
    if not data:
        raise UploadError(422, f"{name}: empty file (0 bytes)", name)
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise UploadError(
            415, f"{name}: not an image file (format not recognised; accepted: "
            f"{', '.join(ALLOWED_FORMATS)})", name) from None
    except Image.DecompressionBombError:
        raise UploadError(422, f"{name}: image dimensions too large", name) from None
    except Exception as exc:
        raise UploadError(422, f"{name}: unreadable image header ({exc})", name) from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise UploadError(
                422, f"{name}: image is {w}x{h} = {w * h / 1e6:.1f} megapixels; this service "
                f"accepts at most {max_pixels / 1e6:.1f} megapixels per image", name)
        try:
            img.load()
            arr = pil_to_uint8(img)
        except Exception as exc:
            raise UploadError(422, f"{name}: truncated or corrupt image data ({exc})", name) \
                from None
    if arr.size == 0:
        raise UploadError(422, f"{name}: image has no pixels", name)
    return resize(convert_channels(arr, channels), size), (w, h)


# ---------------------------------------------------------------------------- body limit
class BodySizeLimit:
    """ASGI middleware: requests with a body over ``limit`` bytes get 413, read or not.

    A declared ``Content-Length`` over the limit is refused before reading; a chunked body is
    counted as it arrives and cut off once it passes the limit.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _reply(self):
        return _error(413, f"upload too large: more than {_mb(self.limit)} in one request "
                      f"(limit {self.limit} bytes); send fewer or smaller images")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reply()(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> dict:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if exceeded:
                return  # the app's reaction to the cut-off body is replaced by the 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._reply()(scope, receive, send)


# ---------------------------------------------------------------------------- schema
class ImageResult(BaseModel):
    """The verdict for one uploaded image."""

    index: int = Field(description="position of the file in the request")
    file: str = Field(description="the uploaded file name")
    width: int = Field(description="original image width in pixels")
    height: int = Field(description="original image height in pixels")
    score: float | None = Field(description="raw anomaly score (higher = more abnormal)")
    normalized_score: float | None = Field(description="score in [0, 1]; threshold at 0.5")
    threshold: float
    verdict: Literal["ok", "defect"]
    heatmap_png: str | None = Field(
        None, description="base64 RGBA PNG at the model input size; stretch it over the image")
    overlay_png: str | None = Field(
        None, description="base64 PNG: the image at the model input size with the heatmap")


class Summary(BaseModel):
    total: int
    ok: int
    defect: int


class PredictResponse(BaseModel):
    model: str
    threshold: float
    heatmap_scale: Literal["score", "image"] = Field(
        description="'score': heatmap colour 0.5 is the decision threshold; 'image': each "
        "heatmap is scaled to its own range")
    results: list[ImageResult]
    summary: Summary
    elapsed_ms: float


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong, naming the uploaded file")
    file: str | None = Field(None, description="the uploaded file at fault")
    index: int | None = Field(None, description="its position in the request")


class ModelInfo(BaseModel):
    """What the service runs; ``info`` holds the full training record."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="detector type, e.g. ncae, patchcore")
    runtime: Literal["torch", "onnxruntime"]
    input_size: list[int] = Field(description="[height, width] the images are resized to")
    channels: int
    color: Literal["gray", "rgb"]
    threshold: dict[str, Any] = Field(description="value, rule and calibration numbers")
    threshold_rule: str
    threshold_description: str
    normalization: dict[str, Any]
    training: dict[str, Any] = Field(description="training data summary and split sizes")
    info: dict[str, Any]
    heatmap: dict[str, Any]
    limits: dict[str, int]
    flawscope_version: str


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    runtime: str


# ---------------------------------------------------------------------------- service
def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Service:
    """The model, the worker pool and the request logic (independent of HTTP)."""

    def __init__(self, inspector: AnyInspector, limits: Limits) -> None:
        self.inspector = inspector
        self.limits = limits
        self.pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="flawscope-worker")
        self.pending = 0
        self.runtime = getattr(inspector, "runtime", "torch")
        self.heatmap_scale = (
            inspector.map_scale if isinstance(inspector, OnnxInspector)
            else map_scale(inspector.detector)
        )

    def model_info(self) -> dict[str, Any]:
        meta = self.inspector.metadata()
        info = dict(meta.get("info") or {})
        h, w = self.inspector.input_size
        return {
            "model": meta["model"],
            "runtime": self.runtime,
            "input_size": [h, w],
            "channels": self.inspector.channels,
            "color": "gray" if self.inspector.channels == 1 else "rgb",
            "threshold": meta["threshold"],
            "threshold_rule": self.inspector.threshold.rule,
            "threshold_description": self.inspector.threshold.describe(),
            "normalization": meta["normalization"],
            "training": {k: info[k] for k in ("data", "split", "trained_at", "fit_seconds")
                         if k in info},
            "info": info,
            "heatmap": {"colormap": COLORMAP, "scale": self.heatmap_scale,
                        "size": [h, w], "format": "RGBA PNG, base64"},
            "limits": {"max_upload_bytes": self.limits.max_upload_bytes,
                       "max_pixels": self.limits.max_pixels,
                       "max_files": self.limits.max_files},
            "flawscope_version": __version__,
        }

    def run(
        self, uploads: Sequence[tuple[str, bytes]], heatmap: bool, overlay: bool
    ) -> dict[str, Any]:
        """Decode, score and render one request (runs in a worker thread)."""
        t0 = time.perf_counter()
        size = self.inspector.input_size
        decoded = []
        for i, (name, data) in enumerate(uploads):
            try:
                decoded.append(decode_upload(data, name, channels=self.inspector.channels,
                                             size=size, max_pixels=self.limits.max_pixels))
            except UploadError as exc:
                exc.index = i
                raise
        batch = np.ascontiguousarray(np.stack([a for a, _ in decoded]).transpose(0, 3, 1, 2))
        preds = self.inspector.predict(batch, with_maps=heatmap or overlay)
        norm = self.inspector.normalization
        results = []
        for i, ((name, _), (arr, (w, h)), p) in enumerate(zip(uploads, decoded, preds)):
            item: dict[str, Any] = {
                "index": i, "file": name, "width": w, "height": h,
                "score": _finite(p.score), "normalized_score": _finite(p.normalized_score),
                "threshold": p.threshold, "verdict": p.verdict,
            }
            if p.anomaly_map is not None:
                values = scale_map(p.anomaly_map, self.heatmap_scale, norm)
                if heatmap:
                    item["heatmap_png"] = _b64(heatmap_png(values))
                if overlay:
                    item["overlay_png"] = _b64(overlay_png(arr, values))
            results.append(item)
        n_defect = sum(r["verdict"] == "defect" for r in results)
        return {
            "model": self.inspector.metadata()["model"],
            "threshold": self.inspector.threshold.value,
            "heatmap_scale": self.heatmap_scale,
            "results": results,
            "summary": {"total": len(results), "ok": len(results) - n_defect,
                        "defect": n_defect},
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2),
        }


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
    device: str = "auto",
) -> FastAPI:
    """The service for ``model`` (a model file, an exported ``.onnx``, or a loaded inspector).

    ``max_upload_bytes``: largest request body; ``max_pixels``: largest image (width x height);
    ``max_files``: most images per request; ``workers``: inference threads (default 1: torch
    and onnxruntime already use every core within one call, and concurrent calls on a busy
    CPU slow each other down badly); ``max_queue``: most requests waiting before 503.
    """
    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels),
                        ("max_files", max_files), ("workers", workers),
                        ("max_queue", max_queue)):
        if int(value) < 1:
            raise ConfigError(f"{name}={value}: must be at least 1")
    inspector = model if isinstance(model, (Inspector, OnnxInspector)) else load_any_model(
        model, device=device)
    limits = Limits(int(max_upload_bytes), int(max_pixels), int(max_files), int(workers),
                    int(max_queue))
    service = Service(inspector, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="flawscope inspection service",
        version=__version__,
        description="Anomaly scores, OK/defect verdicts and heatmaps for uploaded images.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(BodySizeLimit, limit=limits.max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else {}
        return _error(exc.status, exc.message, exc.file, exc.index, **headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    errors = {code: {"model": ErrorResponse} for code in (413, 415, 422, 503)}

    @app.post("/v1/predict", response_model=PredictResponse, responses=errors,
              summary="Score images: verdict, scores and heatmap per image")
    async def predict(
        files: Annotated[list[UploadFile], File(
            description="one or more images (PNG, JPEG, BMP, TIFF, WebP, GIF, PGM/PPM)")],
        heatmap: Annotated[bool, Query(description="include the RGBA heatmap PNG")] = True,
        overlay: Annotated[bool, Query(
            description="include the image blended with the heatmap")] = False,
    ) -> dict[str, Any]:
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
        service.pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(service.pool, service.run, uploads, heatmap,
                                              overlay)
        finally:
            service.pending -= 1

    @app.get("/v1/model", response_model=ModelInfo,
             summary="Model metadata: type, input size, threshold, training data")
    async def model_info() -> dict[str, Any]:
        return service.model_info()

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": service.inspector.metadata()["model"],
                "runtime": service.runtime}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return app
