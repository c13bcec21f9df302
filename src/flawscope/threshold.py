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
from dataclasses import asdict, dataclass, field, fields

import numpy as np
from sklearn.metrics import precision_recall_curve

from flawscope.errors import ConfigError

#: rules ``calibrate`` can apply (``manual``: a threshold set by hand is stored as well)
CALIBRATION_RULES = ("good-quantile", "f1-optimal")
RULES = (*CALIBRATION_RULES, "manual")


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
        """Rebuild a stored threshold, checking every field (a model file may be edited).

        Raises :class:`ConfigError` naming the field (``threshold.value`` ...).
        """
        _check_fields("threshold", d, {f.name for f in fields(cls)})
        if "value" not in d or "rule" not in d:
            raise ConfigError(f"threshold.{'value' if 'value' not in d else 'rule'}: missing")
        rule = d["rule"]
        if rule not in RULES:
            raise ConfigError(f"threshold.rule: {rule!r} is not one of {', '.join(RULES)}")
        max_frr = _optional_finite("threshold.max_frr", d.get("max_frr"))
        if max_frr is not None and not 0.0 <= max_frr < 1.0:
            raise ConfigError(f"threshold.max_frr: {max_frr} is not in [0, 1)")
        if rule == "good-quantile" and max_frr is None:
            raise ConfigError("threshold.max_frr: missing (needed by rule good-quantile)")
        counts = {}
        for name in ("n_good", "n_defect"):
            v = d.get(name, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"threshold.{name}: expected a count >= 0, got {v!r}")
            counts[name] = v
        certified = d.get("certified", True)
        if not isinstance(certified, bool):
            raise ConfigError(f"threshold.certified: expected true or false, got {certified!r}")
        notes = d.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise ConfigError("threshold.notes: expected a list of strings")
        checked = {
            "value": _finite("threshold.value", d["value"]),
            "max_frr": max_frr,
            "certified": certified,
            "notes": list(notes),
            **counts,
            **{name: _optional_finite(f"threshold.{name}", d.get(name))
               for name in ("frr_calibration", "recall_calibration", "f1_calibration")},
        }
        return cls(**{**d, **checked})

    @property
    def frr_bound(self) -> float | None:
        """The false-reject rate this threshold guarantees on new good parts (good-quantile).

        With ``n`` exchangeable calibration scores and the threshold at the ``k``-th smallest,
        the expected rate on a new good part is at most ``(n + 1 - k) / (n + 1)``: the target
        ``max_frr`` when certified, ``1 / (n + 1)`` (the maximum is used) when ``n`` is too
        small. (For leave-one-image-out calibration scores the worst case is twice this,
        README "Thresholds".)
        """
        if self.rule != "good-quantile" or self.max_frr is None or self.n_good <= 0:
            return None
        n = self.n_good
        k = min(math.ceil((n + 1) * (1.0 - self.max_frr)), n)
        return (n + 1 - k) / (n + 1)

    def summary(self) -> str:
        """A few words for headers: the rate a user can rely on, honestly labelled."""
        if self.rule == "good-quantile":
            bound = self.frr_bound
            if self.certified or bound is None:
                return f"≤ {self.max_frr:.2%} of good parts rejected"
            return (f"≤ {bound:.2%} of good parts rejected (target {self.max_frr:.2%} not "
                    f"certified: {self.n_good} calibration images)")
        if self.rule == "f1-optimal":
            return f"F1-optimal (F1 {self.f1_calibration:.3f} on calibration)"
        return "set by hand"

    def describe(self) -> str:
        if self.rule == "good-quantile":
            if self.certified:
                return (
                    f"threshold {self.value:.6g}: at most {self.max_frr:.2%} of good parts "
                    f"rejected (calibrated on {self.n_good} good images, observed "
                    f"{self.frr_calibration:.2%})"
                )
            return (
                f"threshold {self.value:.6g}: NOT certified to reject at most "
                f"{self.max_frr:.2%} of good parts: {self.n_good} calibration images only "
                f"guarantee at most {self.frr_bound:.2%} (the largest calibration score is "
                f"used; at least "
                f"{min_calibration_images(self.max_frr)} are needed for {self.max_frr:.2%})"
            )
        if self.rule == "f1-optimal":
            return (
                f"threshold {self.value:.6g}: F1-optimal on {self.n_good} good + "
                f"{self.n_defect} defect calibration images (F1 {self.f1_calibration:.3f}); "
                "no false-reject rate is guaranteed"
            )
        return f"threshold {self.value:.6g} (set by hand)"

    def frr_warning(self, n_rejected: int, n_good: int, alpha: float = 0.01) -> str | None:
        """A warning when ``n_rejected`` of ``n_good`` test goods is far above the bound.

        "Far" means a one-sided binomial test rejects the guaranteed rate at level ``alpha``
        (so a handful of extra rejects on a small test set does not cry wolf).
        """
        bound = self.frr_bound
        if bound is None or n_good <= 0 or n_rejected <= 0:
            return None
        from scipy.stats import binomtest

        p = binomtest(int(n_rejected), int(n_good), bound, alternative="greater").pvalue
        if p >= alpha:
            return None
        return (
            f"warning: {n_rejected} of {n_good} good test images rejected "
            f"({n_rejected / n_good:.2%}), far above the {bound:.2%} this threshold "
            f"guarantees (binomial p = {p:.2g}): the test goods differ from the calibration "
            "goods (new lighting, batch or camera?) or calibration was too small; "
            "recalibrate with `flawscope calibrate` on current good parts"
        )


def min_calibration_images(max_frr: float) -> int:
    """Fewest calibration images that certify ``max_frr`` (``ceil((n+1)(1-a)) <= n``)."""
    if max_frr <= 0:
        raise ConfigError("max_frr=0 cannot be certified by any number of images")
    return math.ceil(1.0 / max_frr) - 1


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_fields(name: str, d: object, known: set[str]) -> None:
    """``d`` is an object (dict) holding no field outside ``known``; else :class:`ConfigError`
    naming ``name`` or its first unknown field."""
    if not isinstance(d, dict):
        raise ConfigError(f"{name}: expected an object, got {_kind(d)}")
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown field")


def _finite(name: str, value: object) -> float:
    """``value`` as a float if it is a finite JSON number; else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: expected a finite number, got {_kind(value)} {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _optional_finite(name: str, value: object) -> float | None:
    return None if value is None else _finite(name, value)


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
            f"(needs at least "
            f"{min_calibration_images(max_frr) if max_frr > 0 else 'infinitely many'}); "
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
    def from_dict(cls, d: dict) -> ScoreNormalization:
        """Rebuild a stored normalisation: both values finite, ``low < threshold``.

        Raises :class:`ConfigError` naming the field (``normalization.low`` ...).
        """
        _check_fields("normalization", d, {"low", "threshold"})
        for name in ("low", "threshold"):
            if name not in d:
                raise ConfigError(f"normalization.{name}: missing")
        low = _finite("normalization.low", d["low"])
        threshold = _finite("normalization.threshold", d["threshold"])
        if not low < threshold:
            raise ConfigError(
                f"normalization.low: {low} must be below normalization.threshold {threshold}")
        return cls(low=low, threshold=threshold)

    @classmethod
    def fit(cls, good_scores: np.ndarray, threshold: float) -> ScoreNormalization:
        low = float(np.median(good_scores))
        if low >= threshold:
            low = threshold - max(abs(threshold), 1e-6) * 0.5
        return cls(low=low, threshold=float(threshold))
