"""The pydantic models of the API's answers (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RegionResult(BaseModel):
    """One defect region (see :mod:`flawscope.regions`), in original-image pixels."""

    bbox: list[int] = Field(description="[x0, y0, x1, y1], x1/y1 exclusive")
    area_px: int = Field(description="area in original-image pixels")
    max_score: float = Field(description="highest raw anomaly-map value in the region")
    peak: bool = Field(description="true: nothing passed the pixel threshold and minimum "
                       "area, this is the region around the map maximum")
    area_mm2: float | None = Field(None, description="area in mm^2 (with mm_per_pixel)")
    status: str = Field("defect", description="'defect' on a part judged defective; 'watch' "
                        "on a part judged OK whose map still crosses the pixel threshold")


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
    record_id: int | None = Field(
        None, description="the inspection record of this verdict (null when the service "
        "records nothing, --db off)")
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
    request_id: str | None = Field(None, description="this request's id (also the "
                                   "X-Request-ID header, the logs and the records)")


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



# ---------------------------------------------------------------------------- records
class ReviewEntry(BaseModel):
    """One review decision (the record's history, oldest first)."""

    id: int
    created_at: datetime
    truth: Literal["good", "defect"]
    defect_type: str | None = None
    note: str | None = None
    reviewer: str
    api_key: str | None = Field(None, description="name of the API key used")


class InspectionRecord(BaseModel):
    """One recorded verdict, with its latest review."""

    model_config = ConfigDict(extra="allow")

    id: int
    created_at: datetime = Field(description="UTC")
    request_id: str
    image_index: int = Field(description="position of the image in its request")
    source: str = Field(description="serve or predict")
    station: str | None = None
    line: str | None = None
    camera: str | None = None
    part_id: str | None = None
    model_id: str = Field(description="SHA-256 of the model file")
    threshold: float
    file_name: str
    image_sha256: str
    image_format: str
    image_bytes: int
    width: int
    height: int
    score: float | None
    normalized_score: float | None
    verdict: Literal["ok", "defect"]
    n_regions: int
    regions: list[dict[str, Any]]
    label: str | None = Field(None, description="the classifier's label, where one is served")
    label_probability: float | None = None
    latency_ms: float
    details: dict[str, Any] = Field(description="the rest of the verdict as answered")
    image_kept: bool
    image_url: str | None = Field(None, description="the kept image (null: not kept)")
    heatmap_url: str | None = None
    truth: Literal["good", "defect"] | None = Field(None, description="latest review")
    defect_type: str | None = None
    reviewed_at: datetime | None = None
    reviewer: str | None = None


class InspectionDetail(InspectionRecord):
    reviews: list[ReviewEntry] = Field(default_factory=list)
    model: dict[str, Any] | None = Field(None, description="the model's name, type, "
                                         "threshold when first seen")
    image_png: str | None = Field(None, description="?embed=true: the image, base64")
    heatmap_png: str | None = Field(None, description="?embed=true: the heat map, base64 "
                                    "RGBA PNG at the model's input size")


class InspectionPage(BaseModel):
    items: list[InspectionRecord]
    next_cursor: int | None = Field(description="pass as ?cursor= for the next page; null: "
                                    "no more")


class ReviewRequest(BaseModel):
    """An operator's decision on one record."""

    model_config = ConfigDict(extra="forbid")

    truth: Literal["good", "defect"]
    defect_type: str | None = Field(None, max_length=200,
                                    description="e.g. scratch (truth=defect only)")
    note: str | None = Field(None, max_length=4000)
    reviewer: str | None = Field(None, max_length=200, description="the operator (default: "
                                 "the API key's name)")


class Proportion(BaseModel):
    k: int | None = None
    n: int | None = None
    rate: float | None
    low: float | None
    high: float | None


class Confusion(BaseModel):
    model_config = ConfigDict(extra="allow")

    confidence: float
    counts: dict[str, dict[str, int]] = Field(
        description="reviewed records of the review sample: reject|pass x good|defect")
    reviewed: int
    outside_sample: int = Field(description="reviews of records not in the review sample "
                                "(left out of the rates)")
    false_reject_share: Proportion = Field(description="good parts among reviewed rejects")
    escape_rate: Proportion = Field(description="defective parts among reviewed passes")
    false_reject_rate: dict[str, float | None] = Field(
        description="good parts rejected among all good parts (estimated)")
    inspected: dict[str, int]


class InspectionStats(BaseModel):
    confusion: Confusion
    queue: int = Field(description="records waiting for review (image kept, not reviewed)")
    defect_types: dict[str, int] = Field(description="defect types given in reviews, most "
                                         "frequent first")
    keep_goods: float | None = Field(None, description="share of OK images kept")
