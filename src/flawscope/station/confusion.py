"""Confusion counts of reviewed records and the rates a line decides on, with intervals.

Every defect image is kept for review and OK images are sampled (``--keep-goods``), so the
reviewed records of each verdict are a sample of that verdict's records, in different
proportions. Rates are therefore taken within a verdict, where the sample is uniform:

- ``false_reject_share``: good parts among reviewed rejects, P(good | reject);
- ``escape_rate``: defective parts among reviewed passes, P(defect | pass) (parts shipped
  with a defect);
- ``false_reject_rate``: good parts rejected among all good parts, P(reject | good), combined
  from the two with the reject share R of every record inspected (counted, not sampled):
  ``R p1 / (R p1 + (1 - R)(1 - p2))``. It grows with both p1 and p2, so its interval joins the
  two Clopper-Pearson intervals at (1 + confidence) / 2 each (Bonferroni: jointly at least
  ``confidence``).

Intervals are exact (Clopper-Pearson, :func:`scipy.stats.binomtest`). Reviews of records that
were not in the review sample (e.g. an escape reported later from downstream) are counted in
``outside_sample`` and left out of the rates: they are not a random sample.
"""

from __future__ import annotations

from typing import Any

from scipy.stats import binomtest


def proportion(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """``k`` of ``n`` with its exact (Clopper-Pearson) interval; rate None when ``n`` is 0."""
    if n <= 0:
        return {"k": int(k), "n": 0, "rate": None, "low": None, "high": None}
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return {"k": int(k), "n": int(n), "rate": k / n, "low": float(ci.low),
            "high": float(ci.high)}


def _frr(r: float, p1: float, p2: float) -> float | None:
    num = r * p1
    den = num + (1 - r) * (1 - p2)
    return num / den if den > 0 else None


def confusion(counts: dict[str, Any], confidence: float = 0.95) -> dict[str, Any]:
    """The confusion section of ``GET /v1/inspections/stats`` from
    :meth:`RecordStore.review_counts`."""
    s = counts["sample"]
    rej_good, rej_def = s["defect"]["good"], s["defect"]["defect"]
    pass_good, pass_def = s["ok"]["good"], s["ok"]["defect"]
    share = proportion(rej_good, rej_good + rej_def, confidence)
    escape = proportion(pass_def, pass_good + pass_def, confidence)
    inspected = counts["inspected"]
    total = inspected.get("ok", 0) + inspected.get("defect", 0)
    frr: dict[str, Any] = {"rate": None, "low": None, "high": None, "reject_share": None}
    if total:
        r = inspected.get("defect", 0) / total
        frr["reject_share"] = r
        if share["n"] and escape["n"]:
            joint = (1 + confidence) / 2
            a = proportion(rej_good, share["n"], joint)
            b = proportion(pass_def, escape["n"], joint)
            frr.update(rate=_frr(r, share["rate"], escape["rate"]),
                       low=_frr(r, a["low"], b["low"]), high=_frr(r, a["high"], b["high"]))
    return {
        "confidence": confidence,
        "counts": {"reject": {"good": rej_good, "defect": rej_def},
                   "pass": {"good": pass_good, "defect": pass_def}},
        "reviewed": rej_good + rej_def + pass_good + pass_def,
        "outside_sample": counts.get("outside_sample", 0),
        "false_reject_share": share,
        "escape_rate": escape,
        "false_reject_rate": frr,
        "inspected": {"total": total, **inspected},
    }
