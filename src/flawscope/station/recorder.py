"""Recording verdicts: rows from answers, sampled images, a group-commit writer thread.

The service decodes and scores in its workers, writes the kept images there (content
addressed, before the record exists: an image without a record is harmless, the reverse is
not), then hands the rows of a request to :class:`GroupWriter`, which commits all rows
waiting at that moment in one transaction, and only then answers. So a record acknowledged
to a client is committed, and concurrent requests share one commit (one fsync).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from flawscope.station.images import image_suffix, sha256
from flawscope.station.store import RecordStore, finite, utcnow

log = logging.getLogger("flawscope.station")

#: keys of a result that have their own columns (the rest goes to ``details``)
_COLUMN_KEYS = {"index", "file", "width", "height", "score", "normalized_score",
                "threshold", "verdict", "regions", "heatmap_png", "overlay_png", "record_id"}
#: request fields naming where a part was inspected (form fields or X-Station etc. headers)
CONTEXT_FIELDS = ("station", "line", "camera", "part_id")


@dataclass(frozen=True)
class ModelIdentity:
    """The model a verdict came from: ``id`` is the SHA-256 of its file's bytes."""

    id: str
    name: str
    kind: str
    threshold: float
    info: dict[str, Any]

    @classmethod
    def of(cls, inspector: Any, path: str | os.PathLike | None = None) -> ModelIdentity:
        """From the model file at ``path``; without a file (an inspector built in Python),
        the SHA-256 of its metadata, named ``in-memory``."""
        meta = inspector.metadata()
        if path is not None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digest, name = h.hexdigest(), Path(path).name
        else:
            digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())\
                .hexdigest()
            name = "in-memory"
        info = {"threshold": meta.get("threshold"), "normalization": meta.get("normalization"),
                "input_size": meta.get("input_size"), "channels": meta.get("channels"),
                "runtime": getattr(inspector, "runtime", "torch")}
        return cls(digest, name, str(meta.get("model", "?")),
                   float(inspector.threshold.value), info)


def keep_good(digest: str, rate: float) -> bool:
    """Whether a good part's image is in the sample of ``rate`` (0-1): decided by its
    digest, so the same image always gets the same answer and the sample is uniform."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    return int(digest[:15], 16) / 16**15 < rate


def clean_context(values: dict[str, Any]) -> dict[str, str | None]:
    """Station / line / camera / part id as given (trimmed, at most 200 characters)."""
    out: dict[str, str | None] = {}
    for key in CONTEXT_FIELDS:
        v = values.get(key)
        v = None if v is None else str(v).strip()[:200]
        out[key] = v or None
    return out


def make_row(
    result: dict[str, Any], *, model: ModelIdentity, request_id: str, created_at: datetime,
    file_name: str, image_sha256: str, image_format: str, image_bytes: int,
    latency_ms: float, kept: bool, heatmap_sha256: str | None, source: str,
    context: dict[str, str | None],
) -> dict[str, Any]:
    """One ``inspections`` row from one result of the API (or ``Prediction.to_dict()`` with
    ``width`` / ``height``): known fields in columns, every other field in ``details``, so
    new fields of a verdict are kept without a schema change."""
    cls = result.get("classification") or {}
    regions = result.get("regions") or []
    return {
        "created_at": created_at, "request_id": request_id,
        "image_index": int(result.get("index", 0)), "source": source,
        **{k: context.get(k) for k in CONTEXT_FIELDS},
        "model_id": model.id, "threshold": float(result.get("threshold", model.threshold)),
        "file_name": file_name[:255], "image_sha256": image_sha256,
        "image_format": image_format, "image_bytes": int(image_bytes),
        "width": int(result["width"]), "height": int(result["height"]),
        "score": finite(result.get("score")),
        "normalized_score": finite(result.get("normalized_score")),
        "verdict": str(result["verdict"]), "n_regions": len(regions), "regions": regions,
        "label": cls.get("label"), "label_probability": finite(cls.get("probability")),
        "latency_ms": round(float(latency_ms), 3),
        "details": _jsonable({k: v for k, v in result.items() if k not in _COLUMN_KEYS}),
        "image_kept": bool(kept), "heatmap_sha256": heatmap_sha256,
    }


def _jsonable(obj: Any) -> Any:
    """NaN / inf as None, numpy scalars as Python numbers (JSON columns)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        obj = obj.item()
    if isinstance(obj, float):
        return finite(obj)
    return obj


class Recorder:
    """Turns answers into rows (keeping the sampled images) and commits them.

    ``keep_goods``: share of OK images kept (every defect image is kept).
    """

    def __init__(self, store: RecordStore, model: ModelIdentity, *, keep_goods: float = 0.01,
                 source: str = "serve",
                 on_write: Callable[[float, int], None] | None = None,
                 on_image: Callable[[int], None] | None = None) -> None:
        if not 0 <= keep_goods <= 1:
            raise ValueError(f"keep_goods={keep_goods}: must be between 0 and 1")
        self.store = store
        self.model = model
        self.keep_goods = float(keep_goods)
        self.source = source
        self.on_image = on_image
        store.register_model(model.id, model.name, model.kind, model.threshold, model.info)
        self.writer = GroupWriter(store.add, on_write=on_write)

    def keeps(self, verdict: str, digest: str) -> bool:
        return verdict != "ok" or keep_good(digest, self.keep_goods)

    def prepare(
        self, result: dict[str, Any], data: bytes, *, request_id: str, created_at: datetime,
        file_name: str, latency_ms: float, heatmap: Callable[[], bytes] | None,
        context: dict[str, str | None], digest: str | None = None,
    ) -> dict[str, Any]:
        """The row for one answered image; writes its image (and heat map) when kept.
        Runs in a worker thread, before the commit."""
        digest = digest or sha256(data)
        suffix = image_suffix(data)
        kept = self.keeps(str(result["verdict"]), digest)
        heat_digest = None
        if kept:
            _, new = self.store.images.put(data, suffix, digest)
            if new and self.on_image is not None:
                self.on_image(len(data))
            if heatmap is not None:
                heat_digest, _ = self.store.images.put(heatmap(), "png")
        return make_row(result, model=self.model, request_id=request_id,
                        created_at=created_at, file_name=file_name, image_sha256=digest,
                        image_format=suffix, image_bytes=len(data), latency_ms=latency_ms,
                        kept=kept, heatmap_sha256=heat_digest, source=self.source,
                        context=context)

    def commit(self, rows: Sequence[dict[str, Any]]) -> Future[list[int]]:
        """Committed ids of ``rows`` (a future; set once the transaction is durable)."""
        return self.writer.submit(rows)

    def close(self) -> None:
        self.writer.close()


class GroupWriter:
    """One thread that writes every batch waiting in its queue in one transaction.

    ``write(rows) -> ids`` must be all-or-nothing. If a combined transaction fails, each
    submission is retried alone, so one bad request cannot fail the others.
    """

    def __init__(self, write: Callable[[list[dict]], list[int]], *, max_rows: int = 2000,
                 on_write: Callable[[float, int], None] | None = None) -> None:
        self._write = write
        self._max_rows = max_rows
        self._on_write = on_write
        self._queue: queue.Queue[tuple[list[dict], Future] | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="flawscope-recorder",
                                        daemon=True)
        self._thread.start()

    def submit(self, rows: Sequence[dict[str, Any]]) -> Future[list[int]]:
        fut: Future[list[int]] = Future()
        if self._closed:
            fut.set_exception(RuntimeError("the record writer is closed"))
        elif not rows:
            fut.set_result([])
        else:
            self._queue.put((list(rows), fut))
        return fut

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            n = len(item[0])
            stop = False
            while n < self._max_rows:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                n += len(nxt[0])
            self._flush(batch)
            if stop:
                return

    def _flush(self, batch: list[tuple[list[dict], Future]]) -> None:
        rows = [r for part, _ in batch for r in part]
        t0 = time.perf_counter()
        try:
            ids = self._write(rows)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) == 1:
                log.error("record write failed: %s: %s", type(exc).__name__, exc)
                batch[0][1].set_exception(exc)
                return
            for part, fut in batch:
                self._flush([(part, fut)])
            return
        if self._on_write is not None:
            self._on_write(time.perf_counter() - t0, len(rows))
        start = 0
        for part, fut in batch:
            fut.set_result(ids[start:start + len(part)])
            start += len(part)


def record_predictions(
    db: str | os.PathLike, model_path: str | os.PathLike, inspector: Any,
    predictions: Sequence[Any], *, images: str | os.PathLike | None = None,
    keep_goods: float = 0.01, context: dict[str, Any] | None = None,
) -> list[int]:
    """``flawscope predict --record DB``: one record per prediction (``Prediction`` with
    ``path``; maps give the kept images' heat maps), in one transaction; their ids."""
    import uuid

    from flawscope.data.images import image_dimensions
    from flawscope.heatmap import heatmap_png, scale_map
    from flawscope.io import printable

    store = RecordStore(db, images)
    try:
        recorder = Recorder(store, ModelIdentity.of(inspector, model_path),
                            keep_goods=keep_goods, source="predict")
        scale = inspector.map_scale  # as the service colours them
        request_id = uuid.uuid4().hex
        ctx = clean_context(context or {})
        rows = []
        for i, p in enumerate(predictions):
            data = Path(p.path).read_bytes()
            h, w = p.image_size or image_dimensions(p.path)
            # names that are not valid UTF-8 are stored escaped (the database holds UTF-8)
            result = {**p.to_dict(), "path": printable(str(p.path)), "index": i, "width": w,
                      "height": h}

            def heat(p: Any = p) -> bytes:
                return heatmap_png(scale_map(p.anomaly_map, scale, inspector.normalization))

            rows.append(recorder.prepare(
                result, data, request_id=request_id, created_at=utcnow(),
                file_name=printable(Path(p.path).name), latency_ms=0.0,
                heatmap=heat if p.anomaly_map is not None else None, context=ctx))
        ids = recorder.commit(rows).result()
        recorder.close()
        return ids
    finally:
        store.close()
