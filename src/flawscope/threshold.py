"""Decision thresholds calibrated on held-out images, and score normalisation.

Two rules:

``good-quantile``
    From good images alone: the smallest threshold that rejects at most ``max_frr`` of the
    calibration goods, with the finite-sample (conformal) correction: the
    ``ceil((n + 1) * (1 - max_frr))``-th smallest calibration score. If the calibration set
    is too small to certify ``max_frr`` the maximum is used and ``certified`` is False.
``f1-optimal``
    When labelled defects are available: the threshold that maximises F1 on the calibration
    goods and defects.

A sample is a defect when ``score > threshold``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import precision_recall_curve

from flawscope.errors import ConfigError

RULES = ("good-quantile", "f1-optimal", "manual")


@dataclass(frozen=True)
class Threshold:
    """A calibrated decision threshold with the numbers behind it."""

    value: float
    rule: str
    max_frr: float | None = None  # target false-reject rate on good parts
    frr_calibration: float | None = None  # observed false-reject rate on the calibration goods
    recall_calibration: float | None = None  # observed defect recall (f1 rule)
    f1_calibration: float | None = None
    n_good: int = 0
    n_defect: int = 0
    certified: bool = True
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Threshold:
        return cls(**d)

    def describe(self) -> str:
        if self.rule == "good-quantile":
            txt = (
                f"threshold {self.value:.6g}: at most {self.max_frr:.2%} of good parts rejected "
                f"(calibrated on {self.n_good} good images, observed {self.frr_calibration:.2%})"
            )
            if not self.certified:
                txt += "; too few calibration images to certify this rate"
            return txt
        if self.rule == "f1-optimal":
            return (
                f"threshold {self.value:.6g}: F1-optimal on {self.n_good} good + "
                f"{self.n_defect} defect calibration images (F1 {self.f1_calibration:.3f})"
            )
        return f"threshold {self.value:.6g} (set by hand)"


def _check_scores(name: str, scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ConfigError(f"{name}: no scores to calibrate on (is the calibration split empty?)")
    if not np.all(np.isfinite(scores)):
        raise ConfigError(f"{name}: scores contain NaN or infinity")
    return scores


def calibrate_good_quantile(good_scores: np.ndarray, max_frr: float = 0.01) -> Threshold:
    """Threshold from good images only, for a stated false-reject rate ``max_frr``."""
    if not 0.0 <= max_frr < 1.0:
        raise ConfigError(f"max_frr={max_frr}: must be in [0, 1)")
    good = np.sort(_check_scores("good calibration scores", good_scores))
    n = good.size
    k = math.ceil((n + 1) * (1.0 - max_frr))  # 1-based rank of the conformal quantile
    certified = k <= n
    notes = []
    if certified:
        value = float(good[k - 1])
    else:
        value = float(good[-1])
        notes.append(
            f"{n} calibration images cannot certify a {max_frr:.2%} false-reject rate "
            f"(needs at least {math.ceil(1 / max_frr) - 1 if max_frr > 0 else 'infinitely many'}); "
            "the largest calibration score is used"
        )
    frr = float(np.mean(good > value))
    return Threshold(value, "good-quantile", max_frr=max_frr, frr_calibration=frr, n_good=n,
                     certified=certified, notes=notes)


def calibrate_f1(good_scores: np.ndarray, defect_scores: np.ndarray) -> Threshold:
    """F1-optimal threshold from labelled calibration goods and defects."""
    good = _check_scores("good calibration scores", good_scores)
    bad = _check_scores("defect calibration scores", defect_scores)
    y = np.r_[np.zeros(good.size), np.ones(bad.size)]
    s = np.r_[good, bad]
    precision, recall, thr = precision_recall_curve(y, s)
    # precision_recall_curve predicts defect when score >= thr; we use score > value, so the
    # value is placed just below the chosen score (midpoint to the next lower distinct score).
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall + 1e-300), 0)
    i = int(np.argmax(f1[:-1]))
    chosen = thr[i]
    lower = s[s < chosen]
    if lower.size:
        value = float((chosen + lower.max()) / 2)
    else:
        value = float(np.nextafter(chosen, -np.inf))
    return Threshold(
        value, "f1-optimal", frr_calibration=float(np.mean(good > value)),
        recall_calibration=float(np.mean(bad > value)), f1_calibration=float(f1[i]),
        n_good=good.size, n_defect=bad.size,
    )


@dataclass(frozen=True)
class ScoreNormalization:
    """Piecewise-linear map of raw scores to [0, 1] with the threshold at 0.5.

    ``low`` (median good calibration score) -> 0, ``threshold`` -> 0.5,
    ``threshold + (threshold - low)`` -> 1; clipped. Monotone, so verdicts are unchanged.
    """

    low: float
    threshold: float

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        span = max(self.threshold - self.low, 1e-12)
        return np.clip(0.5 + 0.5 * (scores - self.threshold) / span, 0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def fit(cls, good_scores: np.ndarray, threshold: float) -> ScoreNormalization:
        low = float(np.median(good_scores))
        if low >= threshold:
            low = threshold - max(abs(threshold), 1e-6) * 0.5
        return cls(low=low, threshold=float(threshold))
