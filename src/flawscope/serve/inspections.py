"""The review API over the record store.

``GET /v1/inspections``              filtered, keyset-paged list, newest first
``GET /v1/inspections/stats``        confusion counts and rates of the reviewed records
``GET /v1/inspections/{id}``         one record with its review history (``?embed=true``:
                                     image and heat map inline)
``GET /v1/inspections/{id}/image``   the kept image (``?as=png`` for browsers: TIFF, PGM)
``GET /v1/inspections/{id}/heatmap`` the kept heat map (RGBA PNG at the model's input size)
``POST /v1/inspections/{id}/review`` truth ``good|defect``, defect type, note, reviewer
``POST /v1/admin/prune``             apply the image retention now (admin)

Handlers are plain functions: FastAPI runs them in its thread pool (the database calls block).
No ``from __future__ import annotations`` here: FastAPI must evaluate the annotations that
name this module's local dependencies.
"""

import base64
import io
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from flawscope.serve.errors import UploadError
from flawscope.serve.schemas import (
    ErrorResponse,
    InspectionDetail,
    InspectionPage,
    InspectionStats,
    ReviewRequest,
)
from flawscope.station.confusion import confusion
from flawscope.station.db import StoreError
from flawscope.station.logs import audit_log
from flawscope.station.store import RecordFilter, RecordStore, Retention

#: formats browsers show as they are; others are converted for ``?as=png``
BROWSER_FORMATS = {"png": "image/png", "jpg": "image/jpeg", "gif": "image/gif",
                   "webp": "image/webp", "bmp": "image/bmp"}


def record_json(row: dict[str, Any]) -> dict[str, Any]:
    """A record as the API shows it: links to the kept image and heat map."""
    out = dict(row)
    kept = bool(row.get("image_kept"))
    out["image_url"] = f"/v1/inspections/{row['id']}/image" if kept else None
    out["heatmap_url"] = (f"/v1/inspections/{row['id']}/heatmap"
                          if kept and row.get("heatmap_sha256") else None)
    return out


def inspections_router(store: RecordStore, *, review: Any, admin: Any,
                       retention: Retention | None = None,
                       keep_goods: float | None = None) -> APIRouter:
    """The routes; ``review`` / ``admin``: the dependencies that check the caller's role."""
    router = APIRouter(tags=["records"])
    errors = {code: {"model": ErrorResponse} for code in (401, 403, 404, 422)}

    def filters(
        verdict: Annotated[Literal["ok", "defect"] | None, Query()] = None,
        truth: Annotated[Literal["good", "defect"] | None, Query(
            description="latest review's truth")] = None,
        reviewed: Annotated[bool | None, Query()] = None,
        queue: Annotated[bool | None, Query(
            description="true: the review queue (image kept, not reviewed)")] = None,
        since: Annotated[datetime | None, Query(
            alias="from", description="ISO time, inclusive (no zone: UTC)")] = None,
        until: Annotated[datetime | None, Query(
            alias="to", description="ISO time, exclusive")] = None,
        min_score: Annotated[float | None, Query()] = None,
        max_score: Annotated[float | None, Query()] = None,
        model: Annotated[str | None, Query(description="model id (SHA-256)")] = None,
        part_id: Annotated[str | None, Query()] = None,
        station: Annotated[str | None, Query()] = None,
        line: Annotated[str | None, Query()] = None,
        camera: Annotated[str | None, Query()] = None,
    ) -> RecordFilter:
        return RecordFilter(verdict=verdict, truth=truth, reviewed=reviewed, queue=queue,
                            since=since, until=until, min_score=min_score,
                            max_score=max_score, model_id=model, part_id=part_id,
                            station=station, line=line, camera=camera)

    @router.get("/v1/inspections", response_model=InspectionPage, responses=errors,
                dependencies=[Depends(review)], summary="List inspection records")
    def list_inspections(
        where: Annotated[RecordFilter, Depends(filters)],
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[int | None, Query(description="next_cursor of the previous "
                                            "page")] = None,
        order: Annotated[Literal["asc", "desc"], Query(description="desc: newest first")
                         ] = "desc",
    ) -> dict[str, Any]:
        rows, nxt = store.page(where, limit=limit, cursor=cursor, order=order)
        return {"items": [record_json(r) for r in rows], "next_cursor": nxt}

    @router.get("/v1/inspections/stats", response_model=InspectionStats, responses=errors,
                dependencies=[Depends(review)],
                summary="Confusion counts of reviewed records, rates with intervals")
    def stats(
        since: Annotated[datetime | None, Query(alias="from")] = None,
        until: Annotated[datetime | None, Query(alias="to")] = None,
        model: Annotated[str | None, Query(description="model id (SHA-256)")] = None,
        confidence: Annotated[float, Query(gt=0.5, lt=1)] = 0.95,
    ) -> dict[str, Any]:
        counts = store.review_counts(RecordFilter(since=since, until=until, model_id=model))
        return {"confusion": confusion(counts, confidence), "queue": counts["queue"],
                "defect_types": counts["defect_types"], "keep_goods": keep_goods}

    def _get(record_id: int) -> dict[str, Any]:
        row = store.get(record_id)
        if row is None:
            raise UploadError(404, f"no inspection record {record_id}")
        return row

    @router.get("/v1/inspections/{record_id}", response_model=InspectionDetail,
                responses=errors, dependencies=[Depends(review)],
                summary="One record: verdict, regions, review history, image links")
    def get_inspection(
        record_id: int,
        embed: Annotated[bool, Query(description="include the image (as PNG) and heat map "
                                     "in the answer, base64")] = False,
    ) -> dict[str, Any]:
        row = _get(record_id)
        out = record_json(row)
        m = store.model(row["model_id"])
        out["model"] = None if m is None else {k: m[k] for k in ("name", "kind", "threshold",
                                                                  "first_seen")}
        if embed:
            image = _image_bytes(row, "image", as_png=True)
            heat = _image_bytes(row, "heatmap")
            out["image_png"] = base64.b64encode(image[0]).decode() if image else None
            out["heatmap_png"] = base64.b64encode(heat[0]).decode() if heat else None
        return out

    def _image_bytes(row: dict[str, Any], which: str,
                     as_png: bool = False) -> tuple[bytes, str] | None:
        path = store.image_path(row, which)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if which == "heatmap":
            return data, "image/png"
        fmt = row["image_format"]
        if as_png and fmt not in BROWSER_FORMATS:
            from PIL import Image, ImageOps

            with Image.open(io.BytesIO(data)) as img:
                shown = ImageOps.exif_transpose(img)  # upright, as the service scored it
                if shown.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
                    shown = shown.convert("RGBA" if "A" in shown.getbands() else "RGB")
                buf = io.BytesIO()
                shown.save(buf, "PNG")
            return buf.getvalue(), "image/png"
        return data, BROWSER_FORMATS.get(fmt, "application/octet-stream")

    def _file_route(which: str):
        def serve_file(
            record_id: int,
            as_: Annotated[Literal["original", "png"], Query(
                alias="as", description="png: converted for browsers (TIFF, PGM)")
            ] = "original",
        ) -> Response:
            row = _get(record_id)
            found = _image_bytes(row, which, as_png=as_ == "png")
            if found is None:
                why = ("its image was not kept (an OK part outside the --keep-goods sample) "
                       "or was removed by the retention limits") if not row["image_kept"] \
                    else "the file is missing from the image folder"
                raise UploadError(404, f"inspection record {record_id}: no {which}: {why}")
            data, media = found
            return Response(data, media_type=media,
                            headers={"Cache-Control": "private, max-age=86400"})

        return serve_file

    router.add_api_route("/v1/inspections/{record_id}/image", _file_route("image"),
                         methods=["GET"], dependencies=[Depends(review)], responses=errors,
                         response_class=Response, summary="The kept image of a record")
    router.add_api_route("/v1/inspections/{record_id}/heatmap", _file_route("heatmap"),
                         methods=["GET"], dependencies=[Depends(review)], responses=errors,
                         response_class=Response, summary="The kept heat map of a record")

    @router.post("/v1/inspections/{record_id}/review", response_model=InspectionDetail,
                 responses=errors, summary="Record an operator's decision: good or defect")
    def review_inspection(record_id: int, body: ReviewRequest, request: Request,
                          who: Annotated[Any, Depends(review)]) -> dict[str, Any]:
        key_name = getattr(who, "name", None)
        reviewer = (body.reviewer or "").strip() or key_name
        if not reviewer:
            raise UploadError(422, "reviewer: give the reviewer's name (no API key is in use "
                              "to name them)")
        try:
            store.review(record_id, body.truth, reviewer=reviewer,
                         defect_type=(body.defect_type or "").strip() or None,
                         note=body.note, api_key=key_name)
        except KeyError:
            raise UploadError(404, f"no inspection record {record_id}") from None
        except StoreError as exc:
            raise UploadError(422, str(exc)) from None
        audit_log.info("review %s: %s", record_id, body.truth,
                       extra={"event": "review", "record_id": record_id, "truth": body.truth,
                              "reviewer": reviewer, "key": key_name})
        return get_inspection(record_id)

    @router.post("/v1/admin/prune", responses=errors,
                 summary="Apply the image retention limits now (admin)")
    def prune(who: Annotated[Any, Depends(admin)]) -> dict[str, Any]:
        if retention is None or not retention.active:
            raise UploadError(422, "no retention limits set (--retain-days, --retain-gb)")
        report = store.prune(retention)
        audit_log.info("prune: %d records released, %d files removed", report.records,
                       report.files, extra={"event": "prune", "key": getattr(who, "name", None),
                                            "records": report.records, "files": report.files,
                                            "bytes": report.bytes})
        return {"records": report.records, "files": report.files, "bytes": report.bytes,
                **report.details}

    return router
