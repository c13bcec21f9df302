"""Operating points: what each false-reject target would give, before a threshold is signed off.

A quality engineer chooses a threshold as a trade-off: how many good parts may be scrapped, and
how many defects then escape. :func:`operating_points` puts that trade-off in a table: for each
false-reject target the threshold that the model's own out-of-sample good scores give (the same
conformal rule as :func:`~flawscope.threshold.calibrate_good_quantile`, so it is the threshold
``flawscope calibrate MODEL --max-frr F`` would set), and, where test labels exist, the recall
of defects and the false-reject rate observed on the test goods at that threshold. The
F1-optimal point of the test set is added as a reference (it uses the test labels, so it is an
upper bound of what a threshold could do there, not a calibration).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flawscope.threshold import calibrate_good_quantile

#: false-reject targets shown by ``evaluate`` and the benchmarks
FRR_TARGETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.05)
#: recall below this at the model's threshold gets a recommendation line
LOW_RECALL = 0.8


@dataclass(frozen=True)
class OperatingPoint:
    """One row: a threshold and what it does (test figures NaN where labels are missing)."""

    max_frr: float | None  # the false-reject target (None: the F1-optimal reference point)
    threshold: float
    certified: bool
    recall: float = float("nan")  # defects caught on the test set
    frr_test: float = float("nan")  # good test parts rejected
    n_good: int = 0  # calibration images behind the threshold

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in asdict(self).items()}


def _rates(threshold: float, scores: np.ndarray | None, labels: np.ndarray | None
           ) -> tuple[float, float]:
    if scores is None or labels is None:
        return float("nan"), float("nan")
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=int)
    flagged = s > threshold
    recall = float(flagged[y == 1].mean()) if (y == 1).any() else float("nan")
    frr = float(flagged[y == 0].mean()) if (y == 0).any() else float("nan")
    return recall, frr


def operating_points(
    calibration_scores: np.ndarray,
    test_scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    targets: Sequence[float] = FRR_TARGETS,
) -> list[OperatingPoint]:
    """One :class:`OperatingPoint` per false-reject target, thresholds from
    ``calibration_scores`` (out-of-sample scores of good images), rates on the test scores."""
    cal = np.asarray(calibration_scores, dtype=np.float64)
    rows = []
    for target in targets:
        t = calibrate_good_quantile(cal, target)
        rows.append(OperatingPoint(target, t.value, t.certified,
                                   *_rates(t.value, test_scores, labels), n_good=t.n_good))
    return rows


def f1_optimal_point(test_scores: np.ndarray, labels: np.ndarray) -> OperatingPoint | None:
    """The test set's F1-optimal threshold (a reference; None without both classes)."""
    y = np.asarray(labels, dtype=int)
    if not (y == 0).any() or not (y == 1).any():
        return None
    from flawscope.threshold import calibrate_f1

    s = np.asarray(test_scores, dtype=np.float64)
    t = calibrate_f1(s[y == 0], s[y == 1])
    return OperatingPoint(None, t.value, False, *_rates(t.value, s, y), n_good=int((y == 0).sum()))


def recall_at(calibration_scores: np.ndarray, test_scores: np.ndarray, labels: np.ndarray,
              max_frr: float) -> float:
    """Recall of the test defects at the ``max_frr`` threshold of the calibration scores."""
    return operating_points(calibration_scores, test_scores, labels, (max_frr,))[0].recall


def recommendation(points: Sequence[OperatingPoint], current_frr: float | None,
                   model: str = "MODEL") -> str | None:
    """One line when recall at the model's own target is low: what a looser target would
    catch, and the command that sets it (None when recall is fine or unknown)."""
    by_target = {p.max_frr: p for p in points if p.max_frr is not None}
    here = by_target.get(current_frr)
    if here is None or not np.isfinite(here.recall) or here.recall >= LOW_RECALL:
        return None
    better = [p for p in points if p.max_frr is not None and p.max_frr > current_frr
              and np.isfinite(p.recall) and p.recall > here.recall]
    text = (f"at {current_frr:.1%} false rejects {1 - here.recall:.0%} of the test defects "
            "pass")
    if not better:
        return text + "; no looser target in the table catches more"
    best = max(better, key=lambda p: (p.recall, -p.max_frr))
    return (f"{text}; at {best.max_frr:.1%}: {best.recall:.0%} caught — "
            f"`flawscope calibrate {model} --max-frr {best.max_frr:g} -o "
            f"{_output_name(model, best.max_frr)}`")


def _output_name(model: str, max_frr: float) -> str:
    """``part.safetensors`` -> ``part-frr0.05.safetensors`` (the suggested new model file)."""
    from pathlib import PurePath

    p = PurePath(model)
    suffix = p.suffix or ".safetensors"
    return str(p.with_name(f"{p.stem}-frr{max_frr:g}{suffix}"))
