"""The inspector: a fitted detector + calibrated threshold + score normalisation.

This is the unit a user trains, saves, loads, serves and exports. Training from a dataset:

1. detectors that calibrate themselves (``Detector.self_calibrating``: PatchCore, PaDiM) are
   fitted on *every* good training image and return out-of-sample scores of those images
   (leave-one-image-out); for the others (the autoencoders) the good training images are split
   by file-name hash into fit / validation / calibration (:func:`flawscope.data.split_good`)
   and the detector is fitted on *fit*, with early stopping on *validation*;
2. the threshold is calibrated on the out-of-sample good scores for a stated false-reject
   rate, or F1-optimal when labelled defects are given and the rule asks for it;
3. scores are normalised so that the threshold maps to 0.5.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flawscope import __version__
from flawscope.data.dataset import Dataset, Sample, hash_fraction, split_good
from flawscope.data.source import ImageInput
from flawscope.errors import ConfigError, ModelFileError
from flawscope.modelfile import load_model, save_model
from flawscope.models import Detector, create, get_model_class
from flawscope.threshold import (
    ScoreNormalization,
    Threshold,
    calibrate_f1,
    calibrate_good_quantile,
)

THRESHOLD_RULES = ("good-quantile", "f1-optimal")
#: the detector ``flawscope fit`` and :meth:`Inspector.train` use when none is named: the most
#: accurate on the benchmark datasets (README, "Detection quality")
DEFAULT_MODEL = "patchcore"
MODEL_KIND = "detector"


@dataclass
class Prediction:
    """The verdict for one image."""

    path: str | None
    score: float
    normalized_score: float
    threshold: float
    verdict: str  # "ok" | "defect"
    anomaly_map: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("anomaly_map")
        return d


def make_predictions(
    images: ImageInput,
    scores: np.ndarray,
    maps: np.ndarray | None,
    threshold: Threshold,
    normalization: ScoreNormalization,
) -> list[Prediction]:
    """Verdicts for scored ``images`` (shared by the PyTorch and the ONNX inspectors)."""
    norm = normalization(scores)
    t = threshold.value
    paths = (
        [None] * len(scores)
        if isinstance(images, np.ndarray)
        else [str(i.path if isinstance(i, Sample) else i) for i in images]
    )
    return [
        Prediction(p, float(s), float(n), t, "defect" if s > t else "ok",
                   maps[i] if maps is not None else None)
        for i, (p, s, n) in enumerate(zip(paths, scores, norm))
    ]


def _split_defects(defects: Sequence[Sample | str | os.PathLike]) -> tuple[list, list]:
    """Labelled defects -> (for learning a score combination, for threshold calibration)."""
    def name(item) -> str:
        return Path(item.path if isinstance(item, Sample) else item).name

    learn = [d for d in defects if hash_fraction("defect:" + name(d)) < 0.5]
    calib = [d for d in defects if hash_fraction("defect:" + name(d)) >= 0.5]
    return learn, calib


class Inspector:
    """A detector with its threshold and score normalisation."""

    def __init__(
        self,
        detector: Detector,
        threshold: Threshold,
        normalization: ScoreNormalization,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.detector = detector
        self.threshold = threshold
        self.normalization = normalization
        self.info = info or {}

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
            raise ConfigError("no good training images found (the train split is empty)")
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
            calibration = {"calibration": len(good_scores),
                           "calibration_method": "leave-one-image-out scores of training goods"}
        else:
            good_scores = detector.decision_function(cal)
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
        info.update(detector.describe() if hasattr(detector, "describe") else {})
        inspector = cls(detector, Threshold(0.0, "manual"), ScoreNormalization(0.0, 1.0), info)
        defect_scores = (detector.decision_function(calib_defects)
                         if threshold_rule == "f1-optimal" else None)
        return inspector._set_threshold(good_scores, defect_scores, threshold_rule, max_frr)

    def calibrate(
        self,
        good: ImageInput,
        defects: ImageInput | None = None,
        *,
        rule: str = "good-quantile",
        max_frr: float = 0.01,
    ) -> Inspector:
        """Set the threshold and score normalisation from held-out images; returns ``self``.

        ``good``: good images the detector was not fitted on. ``rule``: ``good-quantile``
        (at most ``max_frr`` of good parts rejected) or ``f1-optimal`` (needs ``defects``).
        Used after training, and to re-calibrate a model for a changed line.
        """
        if rule not in THRESHOLD_RULES:
            raise ConfigError(f"threshold rule {rule!r}: choose from {', '.join(THRESHOLD_RULES)}")
        if rule == "f1-optimal" and (defects is None or len(defects) == 0):
            raise ConfigError("threshold rule f1-optimal needs labelled defect images")
        good_scores = self.detector.decision_function(good)
        defect_scores = self.detector.decision_function(defects) if rule == "f1-optimal" else None
        return self._set_threshold(good_scores, defect_scores, rule, max_frr)

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
        return self.detector.score(images, with_maps=with_maps)

    def predict(self, images: ImageInput, *, with_maps: bool = False) -> list[Prediction]:
        scores, maps = self.detector.score(images, with_maps=with_maps)
        return make_predictions(images, scores, maps, self.threshold, self.normalization)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.detector.input_size

    @property
    def channels(self) -> int:
        return self.detector.channels_

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.detector.model_name,
            "input_size": list(self.input_size),
            "channels": self.channels,
            "threshold": self.threshold.to_dict(),
            "normalization": self.normalization.to_dict(),
            "info": self.info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        config = self.metadata()
        config["architecture"] = self.detector.architecture()
        return save_model(path, MODEL_KIND, config, self.detector.state_tensors())

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> Inspector:
        config, tensors = load_model(path, kind=MODEL_KIND)
        try:
            det_cls = get_model_class(config["model"])
            detector = det_cls.from_state(config["architecture"], tensors, device=device,
                                          progress=False)
            threshold = Threshold.from_dict(config["threshold"])
            normalization = ScoreNormalization(**config["normalization"])
        except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as exc:
            raise ModelFileError(f"{path}: model file content is inconsistent ({exc})") from None
        return cls(detector, threshold, normalization, config.get("info", {}))

    def describe(self) -> str:
        return json.dumps(self.metadata(), indent=2, default=str)


def detector_uses_defects(detector: Detector) -> bool:
    return getattr(detector, "score_rule", None) == "learned"
