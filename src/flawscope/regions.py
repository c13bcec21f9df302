"""Defect regions: where on the part the defect is, as boxes with areas.

Rule (the same in the PyTorch and the ONNX inspector):

1. An image whose verdict is ``defect`` gets ``defect`` regions (steps 2-4). An ``ok`` image
   gets a ``watch`` region wherever its map still crosses the pixel threshold (steps 2-3, no
   peak region): "OK, but look here". With the defaults (image score = maximum of the map,
   pixel threshold by the same conformal rule on the same out-of-sample maps) the two
   thresholds coincide, so the region decides the verdict and ``watch`` regions are rare; they
   appear when the pixel threshold is below the image threshold (``calibrate --max-frr`` on
   one of them, older model files with the re-weighted image score).
2. A pixel is defective when its anomaly-map value is above the **pixel threshold**. The pixel
   threshold is calibrated on out-of-sample maps of good images (leave-one-image-out maps of
   the training goods for PatchCore/PaDiM, the held-out calibration goods for the
   autoencoders) like the image threshold: the conformal ``1 - max_frr`` quantile of the map
   *maxima*, so at most ``max_frr`` of good parts would show any defective pixel
   (:data:`DEFAULT_PIXEL_RULE` ``"max"``; chosen by measurement over lower pooled-pixel
   quantiles, see docs/detection-quality.md "Defect regions"). For PaDiM, whose image score is
   the map maximum, it equals the image threshold. Model files without one (older files, the
   ensemble) use the image threshold.
3. Regions are the 8-connected components of the defective pixels (:func:`scipy.ndimage.label`)
   with an area of at least ``min_region_area`` original-image pixels (or ``min_region_mm2``
   given ``mm_per_pixel``).
4. A defect image with no region left by 2-3 gets one **peak region**: the connected component
   around the map maximum of the pixels above half-way between the map's median and its
   maximum, marked ``peak: true``.

Boxes ``[x0, y0, x1, y1]`` and areas are in original-image pixels (``x1``/``y1`` exclusive);
``max_score`` is the raw map value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from flawscope.errors import ConfigError

#: quantiles of each out-of-sample good map kept for the pixel threshold
#: (``calibration_map_stats_`` columns)
MAP_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 1.0)
#: the default pixel-threshold rule: the conformal quantile of good map maxima (see
#: :func:`pixel_threshold_from_stats`)
DEFAULT_PIXEL_RULE = "max"
#: smallest reported region in original-image pixels (a 5 x 5 blob)
DEFAULT_MIN_REGION_AREA = 25.0
_EIGHT = np.ones((3, 3), dtype=bool)


def map_quantile_stats(maps: Any) -> np.ndarray:
    """Per-image quantiles (:data:`MAP_QUANTILES`) of ``N x H x W`` maps (numpy or torch),
    ``N x len(MAP_QUANTILES)`` float64: a compact summary of good maps for calibration."""
    if hasattr(maps, "detach"):
        maps = maps.detach().float().cpu().numpy()
    arr = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    if arr.shape[1] == 0:
        return np.zeros((len(arr), len(MAP_QUANTILES)))
    return np.quantile(arr, MAP_QUANTILES, axis=1).T


def pixel_threshold_from_stats(
    stats: np.ndarray, rule: str = DEFAULT_PIXEL_RULE, max_frr: float = 0.01
) -> float:
    """The pixel threshold from :func:`map_quantile_stats` of out-of-sample good maps.

    ``rule``: ``mean-qQ`` (mean over images of each map's Q quantile, Q in
    :data:`MAP_QUANTILES`) or ``max`` (the conformal ``1 - max_frr`` quantile of the map
    maxima: at most ``max_frr`` of good maps have any pixel above it).
    """
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim != 2 or stats.shape[1] != len(MAP_QUANTILES) or len(stats) == 0:
        raise ConfigError(f"calibration map stats: expected N x {len(MAP_QUANTILES)}, "
                          f"got {stats.shape}")
    if rule == "max":
        from flawscope.threshold import calibrate_good_quantile

        return calibrate_good_quantile(stats[:, -1], max_frr).value
    if rule.startswith("mean-q"):
        try:
            col = MAP_QUANTILES.index(float(rule[len("mean-q"):]))
        except ValueError:
            raise ConfigError(f"pixel rule {rule!r}: quantile not among {MAP_QUANTILES}") \
                from None
        return float(np.mean(stats[:, col]))
    raise ConfigError(f"pixel rule {rule!r}: expected 'max' or 'mean-qQ'")


@dataclass
class Region:
    """One defect region in original-image pixels."""

    bbox: list[int]  # [x0, y0, x1, y1], x1/y1 exclusive
    area_px: int
    max_score: float
    peak: bool = False
    area_mm2: float | None = None
    #: ``defect`` (on a part judged defective) or ``watch`` (on a part judged OK)
    status: str = "defect"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bbox": [int(v) for v in self.bbox], "area_px": int(self.area_px),
                             "max_score": float(self.max_score), "peak": bool(self.peak),
                             "status": self.status}
        if self.area_mm2 is not None:
            d["area_mm2"] = float(self.area_mm2)
        return d


@dataclass(frozen=True)
class RegionRule:
    """Pixel threshold and minimum area (predict-time options)."""

    pixel_threshold: float
    min_region_area: float = DEFAULT_MIN_REGION_AREA  # original-image pixels
    mm_per_pixel: float | None = None
    min_region_mm2: float | None = None  # overrides min_region_area when given

    def __post_init__(self) -> None:
        if not math.isfinite(self.pixel_threshold):
            raise ConfigError(f"pixel_threshold={self.pixel_threshold}: must be finite")
        if not self.min_region_area >= 0:
            raise ConfigError(f"min_region_area={self.min_region_area}: must be >= 0 pixels")
        if self.mm_per_pixel is not None and not self.mm_per_pixel > 0:
            raise ConfigError(f"mm_per_pixel={self.mm_per_pixel}: must be > 0")
        if self.min_region_mm2 is not None:
            if self.mm_per_pixel is None:
                raise ConfigError("min_region_mm2 needs mm_per_pixel (the scale)")
            if not self.min_region_mm2 >= 0:
                raise ConfigError(f"min_region_mm2={self.min_region_mm2}: must be >= 0")

    @property
    def min_area_px(self) -> float:
        if self.min_region_mm2 is not None and self.mm_per_pixel is not None:
            return self.min_region_mm2 / self.mm_per_pixel**2
        return float(self.min_region_area)


def segment(
    amap: np.ndarray, rule: RegionRule, original_size: Sequence[int] | None = None,
    *, peak: bool = True,
) -> tuple[np.ndarray, list[int], bool]:
    """Label image of ``amap`` (map resolution), the labels kept as regions and whether the
    single kept label is the peak region (rule steps 2-4; ``peak=False``: no step 4, as for
    an ``ok`` image's ``watch`` regions)."""
    amap = np.nan_to_num(np.asarray(amap, dtype=np.float64), nan=-np.inf)
    h, w = amap.shape
    oh, ow = (h, w) if original_size is None else (int(original_size[0]), int(original_size[1]))
    px_per_cell = (oh / h) * (ow / w)
    labels, n = ndimage.label(amap > rule.pixel_threshold, structure=_EIGHT)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * px_per_cell
        kept = (np.flatnonzero(sizes >= rule.min_area_px - 1e-9) + 1).tolist()
        if kept or not peak:
            return labels, kept, False
    if not peak:
        return labels, [], False
    peak_at = np.unravel_index(int(np.argmax(amap)), amap.shape)
    peak = amap[peak_at]
    finite = amap[np.isfinite(amap)]
    med = float(np.median(finite)) if finite.size else 0.0
    level = (peak + med) / 2 if peak > med else peak
    labels, _ = ndimage.label(amap >= level, structure=_EIGHT)
    return labels, [int(labels[peak_at])], True


def find_regions(
    amap: np.ndarray,
    rule: RegionRule,
    original_size: Sequence[int] | None = None,
    *,
    defect: bool = True,
) -> list[Region]:
    """Regions of one anomaly map (``H x W`` at the model input size), largest score first.

    ``original_size``: ``(height, width)`` of the image the map belongs to (boxes and areas
    are scaled to it); ``defect``: the image's verdict (an ``ok`` image's regions are
    ``watch`` regions, never a peak region).
    """
    return regions_and_mask(amap, rule, original_size, defect=defect)[0]


def region_mask(
    amap: np.ndarray,
    rule: RegionRule,
    original_size: Sequence[int] | None = None,
    *,
    defect: bool = True,
) -> np.ndarray:
    """Boolean mask (map resolution) of the pixels in :func:`find_regions`' regions."""
    labels, kept, _ = segment(np.asarray(amap), rule, original_size, peak=defect)
    return np.isin(labels, kept)


def regions_and_mask(
    amap: np.ndarray,
    rule: RegionRule,
    original_size: Sequence[int] | None = None,
    *,
    defect: bool = True,
) -> tuple[list[Region], np.ndarray]:
    """:func:`find_regions` and :func:`region_mask` from one segmentation of the map."""
    amap = np.asarray(amap, dtype=np.float64)
    labels, kept, is_peak = segment(amap, rule, original_size, peak=defect)
    status = "defect" if defect else "watch"
    if not kept:  # an OK image whose map stays below the pixel threshold
        return [], np.zeros(amap.shape, dtype=bool)
    h, w = amap.shape
    oh, ow = (h, w) if original_size is None else (int(original_size[0]), int(original_size[1]))
    sy, sx = oh / h, ow / w
    index = np.asarray(kept)
    sizes = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)[index]
    slices = ndimage.find_objects(labels)
    # each region's maximum within its own box (ndimage.maximum sorts the whole map: ~6 ms)
    maxima = [float(amap[slices[lab - 1]][labels[slices[lab - 1]] == lab].max()) for lab in kept]
    regions = []
    for lab, size, top in zip(kept, sizes, maxima):
        ys, xs = slices[lab - 1]
        area = int(round(size * sx * sy))
        bbox = [min(ow, int(math.floor(xs.start * sx))), min(oh, int(math.floor(ys.start * sy))),
                min(ow, int(math.ceil(xs.stop * sx))), min(oh, int(math.ceil(ys.stop * sy)))]
        mm2 = area * rule.mm_per_pixel**2 if rule.mm_per_pixel is not None else None
        regions.append(Region(bbox, area, float(top), is_peak, mm2, status))
    regions.sort(key=lambda r: -r.max_score)
    return regions, np.isin(labels, kept)
