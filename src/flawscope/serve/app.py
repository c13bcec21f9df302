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
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from flawscope import __version__
from flawscope.data.images import convert_channels, decode_image, resize
from flawscope.errors import ConfigError, FlawscopeError, ImageReadError, ModelFileError
from flawscope.pipeline import Inspector
from flawscope.regions import RegionRule, regions_and_mask
from flawscope.runtime import OnnxInspector, load_any_model, map_scale
from flawscope.serve.heatmap import COLORMAP, heatmap_png, overlay_png, scale_map
from flawscope.serve.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_WORKERS,
    Limits,
)

log = logging.getLogger("flawscope.serve")

STATIC_DIR = Path(__file__).parent / "static"
#: where /docs loads the Swagger UI files from (this service, no CDN: works offline)
DOCS_ASSETS = "/docs/assets"
#: decoders the service accepts (Pillow's plugin names); everything else is refused
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")

AnyInspector = Inspector | OnnxInspector
#: how many labels ``classification.top`` lists by default
DEFAULT_TOP_K = 3

if TYPE_CHECKING:
    from flawscope.classify.export import OnnxClassifier
    from flawscope.classify.model import Classifier

    AnyClassifier = Classifier | OnnxClassifier


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
    data: bytes, name: str, *, channels: int | None, size: tuple[int, int] | None,
    max_pixels: int,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Upload bytes -> (uint8 ``H x W x C`` at ``size``, upright original ``(width, height)``).

    ``channels`` / ``size`` None: as decoded (gray stays 1 channel), at the original size.

    The decoding policy of :func:`flawscope.data.images.decode_image` (pixel limit checked
    from the header before decoding, EXIF orientation applied), as ``flawscope predict``
    uses it, so a file scores the same through both; only the decoders are restricted to
    :data:`ALLOWED_FORMATS`. Raises :class:`UploadError`: 415 not an image, 422 otherwise.
    """
    try:
        return decode_image(data, name, channels=channels, size=size, max_pixels=max_pixels,
                            formats=ALLOWED_FORMATS)
    except ImageReadError as exc:
        status = 415 if getattr(exc, "reason", "") == "not-image" else 422
        raise UploadError(status, str(exc), name) from None


def decode_upload_views(
    data: bytes, name: str, views: Sequence[tuple[int, tuple[int, int]]], *, max_pixels: int
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Decode once, then one uint8 ``H x W x C`` per ``(channels, size)`` in ``views``.

    Each view equals :func:`decode_upload` with that ``channels`` and ``size`` (the same
    conversion and resize of the same decoded pixels), so the detector and the classifier
    each see the image as their own ``predict`` would read the file.
    """
    full, original = decode_upload(data, name, channels=None, size=None,
                                   max_pixels=max_pixels)
    return [resize(convert_channels(full, c), size) for c, size in views], original


# ---------------------------------------------------------------------------- body limit
class BodySizeLimit:
    """ASGI middleware: requests with a body over ``limit`` bytes get 413, read or not.

    A declared ``Content-Length`` over the limit is refused before reading; a chunked body is
    counted as it arrives and cut off once it passes the limit.
    """

    def __init__(self, app: Any, limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

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
        too_slow = False
        started = False
        deadline = None if self.timeout is None else time.monotonic() + self.timeout

        async def limited_receive() -> dict:
            nonlocal received, exceeded, too_slow
            if exceeded or too_slow:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(
                    receive(), None if deadline is None else max(deadline - time.monotonic(), 0))
            except TimeoutError:  # a client sending its body too slowly
                too_slow = True
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if exceeded or too_slow:
                return  # the app's reaction to the cut-off body is replaced by 413 / 408
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not (exceeded or too_slow):
                raise
        if exceeded and not started:
            await self._reply()(scope, receive, send)
        elif too_slow and not started:
            await _error(408, f"request body not received within {self.timeout:g} s; "
                         "send it faster or in smaller requests")(scope, receive, send)


# ---------------------------------------------------------------------------- schema
class RegionResult(BaseModel):
    """One defect region (see :mod:`flawscope.regions`), in original-image pixels."""

    bbox: list[int] = Field(description="[x0, y0, x1, y1], x1/y1 exclusive")
    area_px: int = Field(description="area in original-image pixels")
    max_score: float = Field(description="highest raw anomaly-map value in the region")
    peak: bool = Field(description="true: nothing passed the pixel threshold and minimum "
                       "area, this is the region around the map maximum")
    area_mm2: float | None = Field(None, description="area in mm^2 (with mm_per_pixel)")


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
    regions: list[RegionResult] = Field(
        default_factory=list, description="defect regions (none for 'ok')")
    pixel_threshold: float | None = Field(
        None, description="anomaly-map value above which a pixel is defective")
    heatmap_png: str | None = Field(
        None, description="base64 RGBA PNG at the model input size; stretch it over the image")
    overlay_png: str | None = Field(
        None, description="base64 PNG: the image at the model input size with the heatmap "
        "and the outlines of the defect regions")
    classification: Classification | None = Field(
        None, description="label, class, state and probability from the class + state "
        "classifier; absent (null) when the service runs without one (--classifier)")


class LabelProbability(BaseModel):
    label: str
    probability: float


class Classification(BaseModel):
    """The class + state classifier's answer for one image (mean of its folds' softmax)."""

    model_config = ConfigDict(populate_by_name=True)

    label: str = Field(description="the most probable label, e.g. 'casting-defect'")
    class_: str = Field(alias="class", description="its object class, e.g. 'casting'")
    state: str = Field(description="its state, e.g. 'defect' or 'good'")
    probability: float = Field(description="the label's probability")
    top: list[LabelProbability] = Field(
        default_factory=list, description="the most probable labels, highest first (?top_k)")


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


class ClassifierInfo(BaseModel):
    """The class + state classifier served next to the detector."""

    runtime: Literal["torch", "onnxruntime"]
    backbone: str
    input_size: list[int] = Field(description="[height, width] the images are resized to")
    channels: int = Field(description="always 3: gray images are repeated to RGB")
    labels: list[str]
    classes: list[str] = Field(description="the object classes of the labels")
    folds: int | None = Field(None, description="networks in the fold ensemble")
    oof_macro_f1: float | None = Field(None, description="out-of-fold macro F1 at training")


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
    threshold_summary: str = Field(
        description="the false-reject rate a user can rely on, in a few words (an uncertified "
        "target is shown with the rate actually guaranteed)")
    normalization: dict[str, Any]
    training: dict[str, Any] = Field(description="training data summary and split sizes")
    info: dict[str, Any]
    heatmap: dict[str, Any]
    limits: dict[str, int]
    classifier: ClassifierInfo | None = Field(
        None, description="the class + state classifier; null when the service runs without "
        "one")
    flawscope_version: str


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    runtime: str


# ---------------------------------------------------------------------------- service
def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise UploadError(504, "the request took longer than this service's time limit; "
                          "send fewer or smaller images")


def _without_absolute_paths(obj: Any) -> Any:
    """Training-data paths as their last component: clients need not learn the server's
    folder layout (``/srv/data/line3/casting`` -> ``casting``)."""
    if isinstance(obj, dict):
        return {k: _without_absolute_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_without_absolute_paths(v) for v in obj]
    if isinstance(obj, str) and len(obj) > 1 and (obj.startswith("/") or obj[1:3] == ":\\"):
        return obj.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return obj


def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Service:
    """The model, the worker pool and the request logic (independent of HTTP)."""

    def __init__(
        self, inspector: AnyInspector, limits: Limits, classifier: AnyClassifier | None = None
    ) -> None:
        self.inspector = inspector
        self.classifier = classifier
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
        info = _without_absolute_paths(dict(meta.get("info") or {}))
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
            "threshold_summary": self.inspector.threshold.summary(),
            "normalization": meta["normalization"],
            "training": {k: info[k] for k in ("data", "split", "trained_at", "fit_seconds")
                         if k in info},
            "info": info,
            "heatmap": {"colormap": COLORMAP, "scale": self.heatmap_scale,
                        "size": [h, w], "format": "RGBA PNG, base64"},
            "limits": {"max_upload_bytes": self.limits.max_upload_bytes,
                       "max_pixels": self.limits.max_pixels,
                       "max_files": self.limits.max_files},
            "classifier": None if self.classifier is None else classifier_info(self.classifier),
            "flawscope_version": __version__,
        }

    def classify(self, batch: np.ndarray, top_k: int) -> list[dict[str, Any]]:
        """uint8 ``N x 3 x H x W`` at the classifier's size -> ``classification`` records
        (:meth:`Classifier.classify`'s, plus the ``top_k`` most probable labels)."""
        from flawscope.classify.tta import prediction_records

        clf = self.classifier
        assert clf is not None
        proba = clf.predict_proba(batch)
        labels = clf.labels
        records = prediction_records(proba, labels, clf.config.get("label_classes") or {})
        k = min(max(int(top_k), 0), len(labels))
        for rec, row in zip(records, proba):
            order = np.argsort(-row, kind="stable")[:k]
            rec["top"] = [{"label": labels[j], "probability": float(row[j])} for j in order]
        return records

    def run(
        self, uploads: Sequence[tuple[str, bytes]], heatmap: bool, overlay: bool,
        region_rule: RegionRule | None = None, deadline: float | None = None,
        top_k: int = DEFAULT_TOP_K,
    ) -> dict[str, Any]:
        """Decode, score and render one request (runs in a worker thread).

        ``region_rule``: pixel threshold and minimum area of defect regions (default: the
        model's, :meth:`Inspector.region_rule`). ``deadline`` (``time.monotonic()``): past
        it, the request is given up between steps (504) so the worker is free again.
        ``top_k``: labels listed in ``classification.top`` (with a classifier).
        """
        t0 = time.perf_counter()
        total_pixels = 0
        rule = region_rule or self.inspector.region_rule()
        size = self.inspector.input_size
        views = [(self.inspector.channels, size)]
        if self.classifier is not None:  # its own size, RGB, its own normalisation (inside)
            views.append((3, self.classifier.image_size))
        decoded = []
        clf_pixels = []
        for i, (name, data) in enumerate(uploads):
            try:
                if self.classifier is None:
                    decoded.append(decode_upload(data, name, channels=self.inspector.channels,
                                                 size=size, max_pixels=self.limits.max_pixels))
                else:
                    (det_view, clf_view), original = decode_upload_views(
                        data, name, views, max_pixels=self.limits.max_pixels)
                    decoded.append((det_view, original))
                    clf_pixels.append(clf_view)
            except UploadError as exc:
                exc.index = i
                raise
            w, h = decoded[-1][1]
            total_pixels += w * h
            if total_pixels > self.limits.max_request_pixels:
                raise UploadError(413, f"the images of this request hold more than "
                                  f"{self.limits.max_request_pixels / 1e6:g} megapixels together "
                                  f"(limit of the service); send them in several requests")
            _check_deadline(deadline)
        batch = np.ascontiguousarray(np.stack([a for a, _ in decoded]).transpose(0, 3, 1, 2))
        # maps are always needed (regions); regions use the original sizes, not the batch's
        preds = self.inspector.predict(batch, with_maps=True, regions=False)
        classes: list[dict[str, Any] | None] = [None] * len(preds)
        if self.classifier is not None:
            _check_deadline(deadline)
            classes = list(self.classify(
                np.ascontiguousarray(np.stack(clf_pixels).transpose(0, 3, 1, 2)), top_k))
        norm = self.inspector.normalization
        results = []
        for i, ((name, _), (arr, (w, h)), p, cls) in enumerate(
                zip(uploads, decoded, preds, classes)):
            is_defect = p.verdict == "defect"
            regions, mask = regions_and_mask(p.anomaly_map, rule, (h, w), defect=is_defect)
            item: dict[str, Any] = {
                "index": i, "file": name, "width": w, "height": h,
                "score": _finite(p.score), "normalized_score": _finite(p.normalized_score),
                "threshold": p.threshold, "verdict": p.verdict,
                "regions": [r.to_dict() for r in regions],
                "pixel_threshold": _finite(rule.pixel_threshold),
            }
            if cls is not None:
                item["classification"] = cls
            if heatmap or overlay:
                values = scale_map(p.anomaly_map, self.heatmap_scale, norm)
                if heatmap:
                    item["heatmap_png"] = _b64(heatmap_png(values))
                if overlay:
                    item["overlay_png"] = _b64(overlay_png(arr, values, regions=mask))
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


def classifier_info(clf: AnyClassifier) -> dict[str, Any]:
    """The ``classifier`` section of ``GET /v1/model``."""
    from flawscope.classify.tta import class_of

    cfg = clf.config
    label_classes = cfg.get("label_classes") or {}
    h, w = clf.image_size
    oof = cfg.get("oof") or {}
    folds = cfg.get("fold_count") or len(getattr(clf, "nets", ()) or ()) or (
        cfg.get("metadata") or {}).get("fold_count")
    f1 = oof.get("macro_f1")
    return {
        "runtime": "onnxruntime" if hasattr(clf, "session") else "torch",
        "backbone": str(cfg.get("backbone", "?")),
        "input_size": [h, w],
        "channels": 3,
        "labels": clf.labels,
        "classes": sorted({class_of(lab, label_classes) for lab in clf.labels}),
        "folds": int(folds) if folds else None,
        "oof_macro_f1": float(f1) if isinstance(f1, (int, float)) else None,
    }


def load_classifier_model(path: str | os.PathLike, device: str = "auto") -> AnyClassifier:
    """``--classifier``: a classifier model file or its ``.onnx`` export; anything else raises
    :class:`ModelFileError` in one line naming the file."""
    from flawscope.classify.export import load_classifier

    try:
        return load_classifier(path, device=device)
    except ModelFileError as exc:
        raise ModelFileError(f"--classifier {exc}") from None
    except FlawscopeError:
        raise
    except Exception as exc:  # e.g. a safetensors file whose weights do not build
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"--classifier {path}: cannot load the classifier "
                             f"({type(exc).__name__}: {first})") from None


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
    device: str = "auto",
    classifier: str | os.PathLike | AnyClassifier | None = None,
) -> FastAPI:
    """The service for ``model`` (a model file, an exported ``.onnx``, or a loaded inspector).

    ``classifier``: a class + state classifier (model file, its ``.onnx`` export or a loaded
    ``Classifier`` / ``OnnxClassifier``) run on every image next to the detector; each result
    then carries ``classification``. None: results and ``/v1/model`` as without it.

    ``max_upload_bytes``: largest request body; ``max_pixels``: largest image (width x height);
    ``max_files``: most images per request; ``workers``: inference threads (default 1: torch
    and onnxruntime already use every core within one call, and concurrent calls on a busy
    CPU slow each other down badly); ``max_queue``: most requests waiting before 503;
    ``max_request_pixels``, ``request_timeout``, ``body_timeout``: see
    :class:`~flawscope.serve.limits.Limits`.
    """
    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels),
                        ("max_files", max_files), ("workers", workers),
                        ("max_queue", max_queue), ("max_request_pixels", max_request_pixels)):
        if int(value) < 1:
            raise ConfigError(f"{name}={value}: must be at least 1")
    for name, value in (("request_timeout", request_timeout), ("body_timeout", body_timeout)):
        if not float(value) > 0:
            raise ConfigError(f"{name}={value}: must be a positive number of seconds")
    inspector = model if isinstance(model, (Inspector, OnnxInspector)) else load_any_model(
        model, device=device)
    clf = load_classifier_model(classifier, device=device) if isinstance(
        classifier, (str, os.PathLike)) else classifier
    limits = Limits(int(max_upload_bytes), int(max_pixels), int(max_files), int(workers),
                    int(max_queue), int(max_request_pixels), float(request_timeout),
                    float(body_timeout))
    service = Service(inspector, limits, clf)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="flawscope inspection service",
        version=__version__,
        description="Anomaly scores, OK/defect verdicts and heatmaps for uploaded images.",
        lifespan=lifespan,
        docs_url=None,  # /docs below loads Swagger UI from this service, not a CDN
        redoc_url=None,  # ReDoc loads its logo from a CDN even when bundled
    )
    app.state.service = service
    app.add_middleware(BodySizeLimit, limit=limits.max_upload_bytes,
                       timeout=limits.body_timeout)
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

    errors = {code: {"model": ErrorResponse} for code in (408, 413, 415, 422, 503, 504)}

    @app.post("/v1/predict", response_model=PredictResponse, responses=errors,
              summary="Score images: verdict, scores and heatmap per image")
    async def predict(
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
    ) -> dict[str, Any]:
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
        service.pending += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + limits.request_timeout
            work = loop.run_in_executor(service.pool, service.run, uploads, heatmap, overlay,
                                        rule, deadline, top_k)
            try:  # the worker gives up by itself at the deadline (between steps)
                return await asyncio.wait_for(asyncio.shield(work), limits.request_timeout + 5)
            except TimeoutError:
                raise UploadError(504, "the request took longer than this service's time "
                                  "limit; send fewer or smaller images") from None
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
