"""The inspector: a fitted detector + calibrated threshold + score normalisation.

This is the unit a user trains, saves, loads, serves and exports. Training from a dataset:

1. detectors that calibrate themselves (``Detector.self_calibrating``: PatchCore, PaDiM) are
   fitted on *every* good training image and return out-of-sample scores of those images
   (leave-one-image-out); for the others (the autoencoders) the good training images are split
   by file-name hash into fit / validation / calibration (:func:`flawscope.data.split_good`)
   and the detector is fitted on *fit*, with early stopping on *validation*;
2. the threshold is calibrated on the out-of-sample good scores for a stated false-reject
   rate, or F1-optimal when labelled defects are given and the rule asks for it;
3. scores are normalised so that the threshold maps to 0.5;
4. a pixel threshold for defect regions is calibrated on the out-of-sample maps of the same
   goods (:mod:`flawscope.regions`; the rule is stated there).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flawscope import __version__
from flawscope.data.dataset import Dataset, Sample, hash_fraction, split_good
from flawscope.data.fingerprint import describe_seen, fingerprints, seen_before
from flawscope.data.source import ImageInput
from flawscope.errors import ConfigError, ModelFileError
from flawscope.modelfile import read_model, save_model
from flawscope.models import Detector, create, get_model_class
from flawscope.regions import (
    DEFAULT_MIN_REGION_AREA,
    DEFAULT_PIXEL_RULE,
    Region,
    RegionRule,
    map_quantile_stats,
    pixel_threshold_from_stats,
    regions_and_mask,
)
from flawscope.schema import DetectorHeader
from flawscope.threshold import (
    CALIBRATION_RULES,
    ScoreNormalization,
    Threshold,
    calibrate_f1,
    calibrate_good_quantile,
)

THRESHOLD_RULES = CALIBRATION_RULES
#: the detector ``flawscope fit`` and :meth:`Inspector.train` use when none is named: the most
#: accurate on the benchmark datasets (README, "Detection quality")
DEFAULT_MODEL = "patchcore"
log = logging.getLogger(__name__)
MODEL_KIND = "detector"
#: model-file tensor with the training images' fingerprints (not part of the detector)
FINGERPRINTS_TENSOR = "inspector.train_fingerprints"
#: model-file tensors with the out-of-sample good scores and map statistics the thresholds
#: were set on (so a new operating point needs no images: ``calibrate --max-frr``)
CALIBRATION_TENSORS = ("inspector.calibration_scores", "inspector.calibration_map_stats")


@dataclass
class Prediction:
    """The verdict for one image."""

    path: str | None
    score: float
    normalized_score: float
    threshold: float
    verdict: str  # "ok" | "defect"
    anomaly_map: np.ndarray | None = None
    #: defect regions (empty for "ok"; see :mod:`flawscope.regions`)
    regions: list[Region] = field(default_factory=list)
    pixel_threshold: float | None = None
    #: (height, width) of the original image
    image_size: tuple[int, int] | None = None
    #: the pixels of ``regions`` (bool, map resolution; kept with the map)
    region_mask: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "score": self.score,
                "normalized_score": self.normalized_score, "threshold": self.threshold,
                "verdict": self.verdict, "regions": [r.to_dict() for r in self.regions],
                "pixel_threshold": self.pixel_threshold}

    def to_row(self) -> dict[str, Any]:
        """One flat row (:data:`ROW_COLUMNS`) for CSV / Parquet: scores at full precision,
        the threshold, and the regions as a JSON list of ``{bbox, area_px, max_score, ...}``."""
        return {"path": self.path, "score": repr(self.score),
                "normalized_score": f"{self.normalized_score:.6f}",
                "threshold": repr(self.threshold), "verdict": self.verdict,
                "n_regions": len(self.regions),
                "largest_region_area_px": max((r.area_px for r in self.regions), default=0),
                "regions": json.dumps([r.to_dict() for r in self.regions])}


#: columns of :meth:`Prediction.to_row` (``predict --csv``)
ROW_COLUMNS = ("path", "score", "normalized_score", "threshold", "verdict", "n_regions",
               "largest_region_area_px", "regions")


def original_sizes(images: ImageInput) -> list[tuple[int, int]]:
    """``(height, width)`` of every image as given (file headers; array shape)."""
    if isinstance(images, np.ndarray):
        h, w = images.shape[-2:]
        return [(int(h), int(w))] * len(images)
    from flawscope.data.images import image_dimensions

    return [image_dimensions(i.path if isinstance(i, Sample) else i) for i in images]


def make_predictions(
    images: ImageInput,
    scores: np.ndarray,
    maps: np.ndarray | None,
    threshold: Threshold,
    normalization: ScoreNormalization,
    region_rule: RegionRule | None = None,
    *,
    keep_maps: bool = True,
    paths: Sequence[str] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Prediction]:
    """Verdicts (and, given ``maps`` and ``region_rule``, defect regions) for scored ``images``
    (shared by the PyTorch and the ONNX inspectors). ``paths`` and ``image_sizes``: for an
    array of images decoded elsewhere, each one's name and original ``(height, width)``, so
    that regions are in original-image pixels as for files."""
    norm = normalization(scores)
    t = threshold.value
    if paths is None:
        paths = (
            [None] * len(scores)
            if isinstance(images, np.ndarray)
            else [str(i.path if isinstance(i, Sample) else i) for i in images]
        )
    with_regions = maps is not None and region_rule is not None
    if image_sizes is not None:
        sizes = [(int(h), int(w)) for h, w in image_sizes]
    else:
        sizes = original_sizes(images) if with_regions else [None] * len(scores)
    out = []
    for i, (p, s, n) in enumerate(zip(paths, scores, norm)):
        verdict, regions, mask = decide(float(s), t, maps[i] if with_regions else None,
                                        region_rule, sizes[i])
        out.append(Prediction(
            p, float(s), float(n), t, verdict,
            maps[i] if maps is not None and keep_maps else None, regions,
            region_rule.pixel_threshold if region_rule is not None else None, sizes[i],
            mask if keep_maps else None))
    return out


def decide(
    score: float,
    threshold: float,
    amap: np.ndarray | None = None,
    region_rule: RegionRule | None = None,
    original_size: tuple[int, int] | None = None,
) -> tuple[str, list[Region], np.ndarray | None]:
    """The one place a verdict and its regions are decided: ``("defect" if score >
    threshold else "ok", regions, their pixel mask)``; regions (``defect`` on a defective
    part, ``watch`` on an OK one) only with a map and a rule, else ``[]`` and None.
    :func:`make_predictions` (predict, evaluate, the service, the station, Ray) uses it."""
    verdict = "defect" if score > threshold else "ok"
    if amap is None or region_rule is None:
        return verdict, [], None
    regions, mask = regions_and_mask(amap, region_rule, original_size,
                                     defect=verdict == "defect")
    return verdict, regions, mask


def predict_in_chunks(
    scorer: Any,
    images: ImageInput,
    threshold: Threshold,
    normalization: ScoreNormalization,
    region_rule: RegionRule | None,
    *,
    with_maps: bool = False,
    chunk: int = 64,
    paths: Sequence[str] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Prediction]:
    """Score ``images`` ``chunk`` at a time with ``scorer.score`` and make predictions with
    regions; maps are kept only with ``with_maps`` (memory stays bounded otherwise).
    ``paths``, ``image_sizes``: as :func:`make_predictions`."""
    need_maps = with_maps or region_rule is not None
    preds: list[Prediction] = []
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        scores, maps = scorer.score(part, with_maps=need_maps)
        preds += make_predictions(
            part, scores, maps, threshold, normalization, region_rule, keep_maps=with_maps,
            paths=None if paths is None else paths[start : start + chunk],
            image_sizes=None if image_sizes is None else image_sizes[start : start + chunk])
    return preds


def region_rule_for(
    pixel_threshold: dict[str, Any] | None,
    threshold: Threshold,
    *,
    min_region_area: float | None = None,
    mm_per_pixel: float | None = None,
    min_region_mm2: float | None = None,
) -> RegionRule:
    """The region rule of a model: its calibrated pixel threshold (the image threshold for
    model files without one) and the predict-time area options."""
    value = threshold.value if pixel_threshold is None else float(pixel_threshold["value"])
    return RegionRule(value,
                      DEFAULT_MIN_REGION_AREA if min_region_area is None else min_region_area,
                      mm_per_pixel, min_region_mm2)


def calibrate_pixel_threshold(
    stats: np.ndarray | None, max_frr: float, source: str
) -> dict[str, Any] | None:
    """The ``pixel_threshold`` section of a model from out-of-sample good-map statistics."""
    if stats is None or len(stats) == 0:
        return None
    value = pixel_threshold_from_stats(stats, DEFAULT_PIXEL_RULE, max_frr)
    return {"value": value, "rule": DEFAULT_PIXEL_RULE, "n_good": int(len(stats)),
            "source": source}


def _split_defects(defects: Sequence[Sample | str | os.PathLike]) -> tuple[list, list]:
    """Labelled defects -> (for learning a score combination, for threshold calibration)."""
    def name(item) -> str:
        return Path(item.path if isinstance(item, Sample) else item).name

    learn = [d for d in defects if hash_fraction("defect:" + name(d)) < 0.5]
    calib = [d for d in defects if hash_fraction("defect:" + name(d)) >= 0.5]
    return learn, calib


class Verdicts:
    """Verdicts and defect regions from a model's scores and its stored thresholds: shared by
    :class:`Inspector` (PyTorch) and :class:`~flawscope.runtime.OnnxInspector`, which provide
    ``threshold``, ``normalization``, ``pixel_threshold_info``, ``info``, ``model_name``,
    ``input_size``, ``channels`` and :meth:`_scorer` (an object with
    ``score(images, with_maps=...)``)."""

    threshold: Threshold
    normalization: ScoreNormalization
    pixel_threshold_info: dict[str, Any] | None
    info: dict[str, Any]
    model_name: str
    input_size: tuple[int, int]
    channels: int

    def _scorer(self) -> Any:
        raise NotImplementedError

    @property
    def pixel_threshold(self) -> float:
        """Map values above this are defective pixels (see :mod:`flawscope.regions`)."""
        info = self.pixel_threshold_info
        return self.threshold.value if info is None else float(info["value"])

    def region_rule(
        self,
        min_region_area: float | None = None,
        mm_per_pixel: float | None = None,
        min_region_mm2: float | None = None,
    ) -> RegionRule:
        """The model's pixel threshold with the given minimum-area options."""
        return region_rule_for(self.pixel_threshold_info, self.threshold,
                               min_region_area=min_region_area, mm_per_pixel=mm_per_pixel,
                               min_region_mm2=min_region_mm2)

    def predict(
        self,
        images: ImageInput,
        *,
        with_maps: bool = False,
        regions: bool = True,
        min_region_area: float | None = None,
        mm_per_pixel: float | None = None,
        min_region_mm2: float | None = None,
        paths: Sequence[str] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        region_rule: RegionRule | None = None,
    ) -> list[Prediction]:
        """Verdicts, normalised scores and (``regions``) defect regions of ``images``.

        ``min_region_area``: smallest region in original-image pixels (default
        :data:`~flawscope.regions.DEFAULT_MIN_REGION_AREA`); or ``min_region_mm2`` with
        ``mm_per_pixel`` (which also adds ``area_mm2`` to each region). ``paths`` and
        ``image_sizes``: for an array of images decoded elsewhere (e.g. from bytes), each
        one's name and original ``(height, width)``: the predictions are then those of the
        files. ``region_rule``: a rule made already (:meth:`region_rule`), in place of the
        area options.
        """
        if image_sizes is not None and len(image_sizes) != len(images):
            raise ConfigError(f"image_sizes: {len(image_sizes)} sizes for {len(images)} images")
        if paths is not None and len(paths) != len(images):
            raise ConfigError(f"paths: {len(paths)} paths for {len(images)} images")
        rule = None
        if regions:
            rule = region_rule or self.region_rule(min_region_area, mm_per_pixel,
                                                   min_region_mm2)
        return predict_in_chunks(self._scorer(), images, self.threshold, self.normalization,
                                 rule, with_maps=with_maps, paths=paths, image_sizes=image_sizes)

    def metadata(self) -> dict[str, Any]:
        """The model's settings as stored in its file (model file or ONNX metadata)."""
        return {
            "model": self.model_name,
            "input_size": list(self.input_size),
            "channels": self.channels,
            "threshold": self.threshold.to_dict(),
            "normalization": self.normalization.to_dict(),
            "pixel_threshold": self.pixel_threshold_info,
            "info": self.info,
        }


class Inspector(Verdicts):
    """A detector with its threshold and score normalisation.

    ``runtime``: what computes scores and maps, ``"torch"`` (the detector) or
    ``"onnxruntime"`` (the model's cached ONNX export, after :meth:`use_onnxruntime`; see
    :mod:`flawscope.fastruntime`). Thresholds, regions and verdicts are the same either way.
    """

    runtime = "torch"

    def __init__(
        self,
        detector: Detector,
        threshold: Threshold,
        normalization: ScoreNormalization,
        info: dict[str, Any] | None = None,
        pixel_threshold: dict[str, Any] | None = None,
        train_fingerprints: np.ndarray | None = None,
        calibration_scores: np.ndarray | None = None,
        calibration_map_stats: np.ndarray | None = None,
    ) -> None:
        self.detector = detector
        self.threshold = threshold
        self.normalization = normalization
        self.info = info or {}
        #: calibrated pixel threshold section (``value``, ``rule``, ``n_good``, ``source``);
        #: None: regions use the image threshold (model files from before regions)
        self.pixel_threshold_info = pixel_threshold
        #: 64-bit content digests of the good training images (:mod:`flawscope.data.fingerprint`),
        #: so :meth:`calibrate` can refuse them; None for model files from before
        self.train_fingerprints = train_fingerprints
        #: out-of-sample scores of good images the threshold was set on, and per-image
        #: quantiles of their maps (:func:`~flawscope.regions.map_quantile_stats`); None for
        #: model files from before they were stored
        self.calibration_scores = calibration_scores
        self.calibration_map_stats = calibration_map_stats
        self._onnx: Any = None  # the OnnxInspector scoring in place of the detector

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        data: Dataset | ImageInput,
        model: str = DEFAULT_MODEL,
        *,
        max_frr: float = 0.01,
        threshold_rule: str = "good-quantile",
        defects: Sequence[Sample | str | os.PathLike] | None = None,
        validation_fraction: float = 0.1,
        calibration_fraction: float = 0.15,
        checkpoint: str | Path | None = None,
        resume: bool = False,
        **model_options: Any,
    ) -> Inspector:
        """Fit ``model`` on the good training images of ``data`` and calibrate its threshold.

        ``data``: a :class:`Dataset` (its train split is used) or a list of good image paths.
        ``defects``: optional labelled defect images (default: the dataset's training
        defects); half of them teach score rules that learn, half calibrate the F1 rule.
        """
        if threshold_rule not in THRESHOLD_RULES:
            raise ConfigError(
                f"threshold rule {threshold_rule!r}: choose from {', '.join(THRESHOLD_RULES)}"
            )
        if isinstance(data, Dataset):
            goods: Sequence = data.train
            if defects is None:
                defects = data.train_defects
            source = data.summary()
        else:
            goods = data
            source = {"images": len(data)}
        if len(goods) == 0:
            where = f"{data.root}: " if isinstance(data, Dataset) else ""
            raise ConfigError(f"{where}no good training images found (the train split is "
                              "empty; fit learns from images of good parts)")
        defects = list(defects or [])
        learn_defects, calib_defects = _split_defects(defects)
        if threshold_rule == "f1-optimal" and not calib_defects:
            raise ConfigError("threshold rule f1-optimal needs labelled defect images")
        detector = create(model, **model_options)
        if detector.self_calibrating:
            fit, val, cal = list(goods), [], None
        else:
            fit, val, cal = split_good(goods, validation_fraction, calibration_fraction)
            if not cal:
                raise ConfigError(
                    f"{len(goods)} good images are too few to hold out a calibration set")
        t0 = time.perf_counter()
        detector.fit(fit, validation=val, defects=learn_defects or None, checkpoint=checkpoint,
                     resume=resume)
        fit_seconds = time.perf_counter() - t0
        if cal is None:
            good_scores = detector.calibration_scores_
            map_stats = getattr(detector, "calibration_map_stats_", None)
            calibration = {"calibration": len(good_scores),
                           "calibration_method": "leave-one-image-out scores of training goods"}
        else:
            good_scores, map_stats = _scores_and_map_stats(detector, cal)
            calibration = {"calibration": len(cal),
                           "calibration_method": "held-out goods"}
        info = {
            "model": model,
            "flawscope_version": __version__,
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fit_seconds": round(fit_seconds, 2),
            "data": source,
            "split": {"fit": len(fit), "validation": len(val), **calibration,
                      "defects_learn": len(learn_defects) if detector_uses_defects(detector)
                      else 0,
                      "defects_calibration": len(calib_defects)
                      if threshold_rule == "f1-optimal" else 0},
        }
        info.update(detector.describe())
        inspector = cls(detector, Threshold(0.0, "manual"), ScoreNormalization(0.0, 1.0), info,
                        # the held-out calibration goods never shaped the weights: a later
                        # re-calibration on them is honest (validation goods picked the epoch)
                        train_fingerprints=fingerprints([*fit, *val]))
        defect_scores = (detector.decision_function(calib_defects)
                         if threshold_rule == "f1-optimal" else None)
        inspector._set_threshold(good_scores, defect_scores, threshold_rule, max_frr)
        inspector._keep_calibration(good_scores, map_stats)
        inspector.pixel_threshold_info = calibrate_pixel_threshold(
            map_stats, max_frr, calibration["calibration_method"])
        return inspector

    def calibrate(
        self,
        good: ImageInput,
        defects: ImageInput | None = None,
        *,
        rule: str = "good-quantile",
        max_frr: float = 0.01,
        allow_training_images: bool = False,
    ) -> Inspector:
        """Set the threshold and score normalisation from held-out images; returns ``self``.

        ``good``: good images the detector was not fitted on. ``rule``: ``good-quantile``
        (at most ``max_frr`` of good parts rejected) or ``f1-optimal`` (needs ``defects``).
        Used after training, and to re-calibrate a model for a changed line. Copies of training
        images (same file bytes) are refused: their scores are optimistically low, so the
        threshold would reject more good parts than stated. ``allow_training_images`` lets
        them through (with a warning logged).
        """
        if rule not in THRESHOLD_RULES:
            raise ConfigError(f"threshold rule {rule!r}: choose from {', '.join(THRESHOLD_RULES)}")
        if self.train_fingerprints is not None:
            seen = seen_before(good, self.train_fingerprints)
            if seen:
                what = (f"{len(seen)} of the {len(good)} good calibration images were used to "
                        f"train this model ({describe_seen(good, seen)})")
                if not allow_training_images:
                    raise ConfigError(
                        f"{what}: their scores are too low to calibrate on; give good images "
                        "the model has not seen (or --allow-training-images to use them anyway)")
                log.warning("warning: %s; the threshold will reject more good parts than "
                            "stated", what)
        if rule == "f1-optimal" and (defects is None or len(defects) == 0):
            raise ConfigError("threshold rule f1-optimal needs labelled defect images")
        good_scores, map_stats = _scores_and_map_stats(self.detector, good)
        defect_scores = self.detector.decision_function(defects) if rule == "f1-optimal" else None
        self._set_threshold(good_scores, defect_scores, rule, max_frr)
        self._keep_calibration(good_scores, map_stats)
        self.pixel_threshold_info = calibrate_pixel_threshold(map_stats, max_frr,
                                                              "held-out goods")
        return self

    def set_operating_point(self, max_frr: float) -> Inspector:
        """A new false-reject target from the stored calibration scores, no images needed
        (the same rule as training: :func:`calibrate_good_quantile`); returns ``self``.

        Raises :class:`ConfigError` for model files without stored calibration scores.
        """
        if self.calibration_scores is None:
            raise ConfigError("this model file has no stored calibration scores (written by an "
                              "older flawscope): give good images to calibrate on")
        self._set_threshold(self.calibration_scores, None, "good-quantile", max_frr)
        source = (self.pixel_threshold_info or {}).get("source", "calibration goods")
        self.pixel_threshold_info = calibrate_pixel_threshold(self.calibration_map_stats,
                                                              max_frr, source)
        return self

    def _keep_calibration(self, scores: np.ndarray, map_stats: np.ndarray | None) -> None:
        self.calibration_scores = np.asarray(scores, dtype=np.float64)
        self.calibration_map_stats = (None if map_stats is None
                                      else np.asarray(map_stats, dtype=np.float64))

    def _set_threshold(
        self,
        good_scores: np.ndarray,
        defect_scores: np.ndarray | None,
        rule: str,
        max_frr: float,
    ) -> Inspector:
        """Threshold and normalisation from out-of-sample scores of goods (and defects)."""
        if rule == "f1-optimal":
            self.threshold = calibrate_f1(good_scores, defect_scores)
        else:
            self.threshold = calibrate_good_quantile(good_scores, max_frr)
        self.normalization = ScoreNormalization.fit(good_scores, self.threshold.value)
        return self

    # ------------------------------------------------------------------ inference
    def score(self, images: ImageInput, with_maps: bool = True):
        return self._scorer().score(images, with_maps=with_maps)

    def _scorer(self) -> Any:
        return self.detector if self._onnx is None else self._onnx

    def use_onnxruntime(self, graph: str | os.PathLike, threads: int | None = None
                        ) -> Inspector:
        """Score with the ONNX export ``graph`` of this model in onnxruntime (on the
        detector's device); returns ``self``. The graph must take this model's input."""
        from flawscope.runtime import OnnxInspector

        device = "cpu" if self.detector.torch_device.type == "cpu" else "cuda"
        onnx = OnnxInspector(graph, device=device, threads=threads)
        if (tuple(onnx.input_size), onnx.channels) != (tuple(self.input_size), self.channels):
            raise ModelFileError(f"{graph}: takes {onnx.channels} x {onnx.input_size} images, "
                                 f"the model {self.channels} x {self.input_size}")
        self._onnx = onnx
        self.runtime = "onnxruntime"
        return self

    def use_torch(self) -> Inspector:
        """Score with the detector in PyTorch again; returns ``self``."""
        self._onnx = None
        self.runtime = "torch"
        return self

    @property
    def model_name(self) -> str:
        return self.detector.model_name

    @property
    def map_scale(self) -> str:
        """How heat maps are coloured: ``"score"`` (maps share the score's threshold) or
        ``"image"`` (each map scaled to its own range); as :class:`OnnxInspector`'s."""
        return map_scale(self.detector)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.detector.input_size

    @property
    def channels(self) -> int:
        return self.detector.channels_

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        config = self.metadata()
        config["architecture"] = self.detector.architecture()
        tensors = self.detector.state_tensors()
        if self.train_fingerprints is not None:
            tensors = {**tensors, FINGERPRINTS_TENSOR: torch.from_numpy(
                np.asarray(self.train_fingerprints, dtype=np.int64))}
        for name, values in zip(CALIBRATION_TENSORS,
                                (self.calibration_scores, self.calibration_map_stats)):
            if values is not None:
                tensors[name] = torch.from_numpy(np.asarray(values, dtype=np.float64))
        return save_model(path, MODEL_KIND, config, tensors)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str = "auto", *, allow_legacy: bool | None = None
    ) -> Inspector:
        """Read a model file; a tampered, out-of-bounds or inconsistent one raises
        :class:`ModelFileError` naming the file and the field (see :mod:`flawscope.schema`).
        ``allow_legacy``: accept a format-1 file (no checksum of its settings; see
        :func:`flawscope.modelfile.read_model`)."""
        loaded = read_model(path, kind=MODEL_KIND, allow_legacy=allow_legacy)
        header: DetectorHeader = loaded.header
        tensors = dict(loaded.tensors)
        seen = tensors.pop(FINGERPRINTS_TENSOR, None)
        calibration = [tensors.pop(name, None) for name in CALIBRATION_TENSORS]
        calibration = [None if t is None else t.numpy() for t in calibration]
        scores, stats = calibration
        if (scores is not None and (scores.ndim != 1 or not np.isfinite(scores).all())) or (
                stats is not None and (stats.ndim != 2 or not np.isfinite(stats).all())):
            raise ModelFileError(f"{path}: {CALIBRATION_TENSORS[0]}: expected finite "
                                 "calibration scores and map statistics")
        try:
            det_cls = get_model_class(header.model)
            detector = det_cls.from_state(header.architecture, tensors, device=device,
                                          progress=False)
        except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as exc:
            raise ModelFileError(f"{path}: architecture: does not fit the stored weights "
                                 f"({type(exc).__name__}: {exc})") from None
        for field_name, stored, built in (
            ("input_size", header.input_size, tuple(detector.input_size)),
            ("channels", header.channels, detector.channels_),
        ):
            if stored != built:
                raise ModelFileError(f"{path}: {field_name}: {stored} disagrees with the "
                                     f"architecture ({built})")
        return cls(detector, header.threshold, header.normalization, header.info,
                   header.pixel_threshold,
                   train_fingerprints=None if seen is None else seen.numpy(),
                   calibration_scores=scores, calibration_map_stats=stats)

    def describe(self) -> str:
        return json.dumps(self.metadata(), indent=2, default=str)


def _scores_and_map_stats(
    detector: Detector, images: ImageInput, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and :func:`~flawscope.regions.map_quantile_stats` of ``images``, ``chunk`` at a
    time (maps are not kept)."""
    scores, stats = [], []
    for start in range(0, len(images), chunk):
        s, maps = detector.score(images[start : start + chunk], with_maps=True)
        scores.append(s)
        stats.append(map_quantile_stats(maps))
    if not scores:
        return np.zeros(0), np.zeros((0, 5))
    return np.concatenate(scores), np.concatenate(stats)


def map_scale(detector: Any) -> str:
    """How heatmaps are coloured: ``"score"`` when the image score is the maximum of the
    anomaly map (so the map shares the score's threshold and normalisation), else ``"image"``
    (each map scaled to its own range)."""
    return "score" if detector.score_is_map_max else "image"


def detector_uses_defects(detector: Detector) -> bool:
    return detector.learns_from_defects
