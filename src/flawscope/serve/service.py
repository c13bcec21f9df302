"""The request logic, independent of HTTP: decode, score, classify, render and prepare the
records of one request, in bounded pieces (:mod:`flawscope.serve.scheduler`)."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from flawscope import __version__
from flawscope.heatmap import COLORMAP, heatmap_png, overlay_png, scale_map
from flawscope.pipeline import Inspector
from flawscope.regions import RegionRule
from flawscope.runtime import OnnxInspector
from flawscope.serve.decoding import decode_upload, decode_upload_views
from flawscope.serve.errors import UploadError
from flawscope.serve.limits import Limits
from flawscope.serve.scheduler import PREPARE, SCORE, Batch, FairScheduler, run_to_end

AnyInspector = Inspector | OnnxInspector
#: how many labels ``classification.top`` lists by default
DEFAULT_TOP_K = 3
#: threads decoding uploads and rendering results (the model has ``workers`` of its own):
#: two, so that a small request is decoded while a large one's images are
PREPARE_THREADS = 2
#: the longest a scoring piece should take (a request arriving meanwhile waits for it): a
#: batch of fast images, or one slow one
SCORE_PIECE_SECONDS = 0.1

if TYPE_CHECKING:
    from flawscope.classify.export import OnnxClassifier
    from flawscope.classify.model import Classifier
    from flawscope.station.recorder import Recorder

    AnyClassifier = Classifier | OnnxClassifier




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
    """The model, the fair scheduler of its worker threads and the request logic
    (independent of HTTP)."""

    def __init__(
        self, inspector: AnyInspector, limits: Limits, classifier: AnyClassifier | None = None
    ) -> None:
        self.inspector = inspector
        self.classifier = classifier
        self.limits = limits
        self.scheduler = FairScheduler({PREPARE: PREPARE_THREADS, SCORE: limits.workers})
        self.pending = 0
        self.heatmap_scale = inspector.map_scale  # both runtimes say it themselves
        #: scoring time per image of the last piece (sizes the next pieces)
        self._seconds_per_image: float | None = None

    @property
    def runtime(self) -> str:
        """What scores the images now (``torch`` until a background export is ready)."""
        return self.inspector.runtime

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

    def steps(
        self, uploads: Sequence[tuple[str, bytes]], heatmap: bool, overlay: bool,
        region_rule: RegionRule | None = None, deadline: float | None = None,
        top_k: int = DEFAULT_TOP_K, record: RecordPlan | None = None,
    ) -> Generator[str | Batch, Any, tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Decode, score and render one request, one bounded piece between ``yield``\\ s,
        each naming the lane of the next piece (see :mod:`flawscope.serve.scheduler`; the
        first piece is in the prepare lane); returns (the answer, the record rows).

        ``region_rule``: pixel threshold and minimum area of defect regions (default: the
        model's, :meth:`Inspector.region_rule`). ``deadline`` (``time.monotonic()``): past
        it, the request is given up between pieces (504) so the worker is free again.
        ``top_k``: labels listed in ``classification.top`` (with a classifier). ``record``:
        where and how to record (rows are prepared, kept images written; the caller commits).
        Each ``yield`` receives whether other requests wait in that lane: then images are
        scored one at a time, else in batches of about :data:`SCORE_PIECE_SECONDS` (so a
        request arriving meanwhile waits at most that long, or one image).
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
        busy = False
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
            busy = yield PREPARE if i + 1 < len(uploads) else SCORE
        preds: list[Any] = []
        classes: list[dict[str, Any] | None] = []
        n = len(decoded)
        while len(preds) < n:
            lo = len(preds)
            hi = lo + self._chunk(n - lo, busy)
            # scored in one call with the waiting pieces of other requests (micro-batching)
            preds += yield Batch(SCORE, ("score", rule), decoded[lo:hi], hi - lo,
                                 self.limits.micro_batch, partial(self._score_parts, rule))
            _check_deadline(deadline)
            if self.classifier is not None:
                busy = yield SCORE
                classes += self.classify(np.ascontiguousarray(
                    np.stack(clf_pixels[lo:hi]).transpose(0, 3, 1, 2)), top_k)
                _check_deadline(deadline)
            busy = yield SCORE if len(preds) < n else PREPARE
        if self.classifier is None:
            classes = [None] * n
        norm = self.inspector.normalization
        results = []
        rows = []
        for i, ((name, data), (arr, (w, h)), p, cls) in enumerate(
                zip(uploads, decoded, preds, classes)):
            regions, mask = p.regions, p.region_mask  # decided once: pipeline.decide
            item: dict[str, Any] = {
                "index": i, "file": name, "width": w, "height": h,
                "score": _finite(p.score), "normalized_score": _finite(p.normalized_score),
                "threshold": p.threshold, "verdict": p.verdict,
                "regions": [r.to_dict() for r in regions],
                "pixel_threshold": _finite(rule.pixel_threshold),
            }
            if cls is not None:
                item["classification"] = cls
            values = None
            heat_png = None
            if heatmap or overlay:
                values = scale_map(p.anomaly_map, self.heatmap_scale, norm)
                if heatmap:
                    heat_png = heatmap_png(values)
                    item["heatmap_png"] = _b64(heat_png)
                if overlay:
                    item["overlay_png"] = _b64(overlay_png(arr, values, regions=mask))
            if record is not None:
                def heat(p: Any = p, heat_png: bytes | None = heat_png) -> bytes:
                    return heat_png if heat_png is not None else heatmap_png(
                        scale_map(p.anomaly_map, self.heatmap_scale, norm))

                rows.append(record.recorder.prepare(
                    {k: v for k, v in item.items() if k not in ("heatmap_png", "overlay_png")},
                    data, request_id=record.request_id, created_at=record.created_at,
                    file_name=name, latency_ms=0.0, heatmap=heat, context=record.context))
            results.append(item)
            if i + 1 < n:
                _check_deadline(deadline)
                yield PREPARE
        n_defect = sum(r["verdict"] == "defect" for r in results)
        answer = {
            "model": self.inspector.metadata()["model"],
            "threshold": self.inspector.threshold.value,
            "heatmap_scale": self.heatmap_scale,
            "results": results,
            "summary": {"total": len(results), "ok": len(results) - n_defect,
                        "defect": n_defect},
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2),
        }
        return answer, rows

    def _score_parts(self, rule: RegionRule, parts: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """Predictions of several requests' decoded images in one model call (maps always
        kept for heat maps; regions in the uploads' original pixels), split back per part."""
        decoded = [d for part in parts for d in part]
        batch = np.ascontiguousarray(np.stack([a for a, _ in decoded]).transpose(0, 3, 1, 2))
        t0 = time.perf_counter()
        preds = self.inspector.predict(batch, with_maps=True, region_rule=rule,
                                       image_sizes=[(h, w) for _, (w, h) in decoded])
        self._seconds_per_image = (time.perf_counter() - t0) / len(decoded)
        out, start = [], 0
        for part in parts:
            out.append(preds[start : start + len(part)])
            start += len(part)
        return out

    def _chunk(self, remaining: int, busy: bool) -> int:
        """Images to score in the next piece: one while others wait; else as many as fit in
        :data:`SCORE_PIECE_SECONDS` at the last measured speed (one until it is measured)."""
        if busy or self._seconds_per_image is None:
            return 1
        fit = int(SCORE_PIECE_SECONDS / max(self._seconds_per_image, 1e-6))
        return max(1, min(remaining, fit))

    def run(
        self, uploads: Sequence[tuple[str, bytes]], heatmap: bool, overlay: bool,
        region_rule: RegionRule | None = None, deadline: float | None = None,
        top_k: int = DEFAULT_TOP_K,
    ) -> dict[str, Any]:
        """:meth:`steps` in the calling thread, without recording: the answer."""
        return run_to_end(self.steps(uploads, heatmap, overlay, region_rule, deadline,
                                     top_k))[0]


@dataclass
class RecordPlan:
    """How one request is recorded: the recorder, its request id, time and context."""

    recorder: Recorder
    request_id: str
    created_at: datetime
    context: dict[str, str | None]


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
    :class:`ModelFileError` in one line naming the file (as ``predict --classifier``)."""
    from flawscope.twostage import load_type_classifier

    return load_type_classifier(path, device)
