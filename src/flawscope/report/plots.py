"""Report figures as PNG bytes: ROC / PR curves, score histograms, residual-statistic strip
plots and input / reconstruction / residual triplets (anomaly-map overlays are drawn by
:mod:`flawscope.heatmap`, as in the service).

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas, so pyplot and the
user's interactive backend are never touched.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from flawscope.evaluation import EvaluationResult

DPI = 110
GOOD_COLOUR = "#2b83ba"
DEFECT_COLOUR = "#d7191c"


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _labels_scores(result: EvaluationResult) -> tuple[np.ndarray, np.ndarray]:
    return result.labels, np.asarray(result.scores, dtype=np.float64).ravel()


def _both_classes(y: np.ndarray) -> bool:
    return bool((y == 1).any() and (y == 0).any())


def _metric(result: EvaluationResult, key: str, compute) -> float:
    value = result.metrics.get(key)
    if value is None or not np.isfinite(value):
        y, s = _labels_scores(result)
        value = compute(y, s) if _both_classes(y) else float("nan")
    return float(value)


def operating_point(result: EvaluationResult) -> dict[str, float]:
    """False-positive rate, recall and precision at the result's threshold on its test set."""
    y, _ = _labels_scores(result)
    pred = result.defect_flags()
    tp = float(np.sum(pred & (y == 1)))
    return {
        "fpr": float(pred[y == 0].mean()) if (y == 0).any() else float("nan"),
        "tpr": float(pred[y == 1].mean()) if (y == 1).any() else float("nan"),
        "precision": tp / pred.sum() if pred.any() else float("nan"),
    }


def _curves(
    ax: Axes, results: Sequence[EvaluationResult]
) -> Iterator[tuple[EvaluationResult, np.ndarray, np.ndarray, str]]:
    """``(result, labels, scores, colour)`` of each result that has good and defect images;
    the others get a legend entry saying why they have no curve."""
    for i, r in enumerate(results):
        y, s = _labels_scores(r)
        colour = f"C{i}"
        if not _both_classes(y):
            ax.plot([], [], c=colour, label=f"{r.model_name} (needs good and defect images)")
            continue
        yield r, y, s, colour


def _mark_operating_point(ax: Axes, x: float, y: float, colour: str) -> None:
    ax.plot(x, y, "o", c=colour, mec="black", ms=7, zorder=3)


def _curves_png(fig: Figure, ax: Axes, legend_loc: str, **axes: Any) -> bytes:
    """Legend entry for the operating-point marker, axes settings ``axes``, grid, legend."""
    ax.plot([], [], "o", c="white", mec="black", label="operating point (threshold)")
    ax.set(**axes)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=8)
    return _png(fig)


def roc_png(results: Sequence[EvaluationResult]) -> bytes:
    """ROC curve per model (AUROC in the legend), operating point at the threshold marked."""
    fig = _figure(5.6, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", c="0.6", lw=1)
    for r, y, s, colour in _curves(ax, results):
        fpr, tpr, _ = roc_curve(y, s)
        auc = _metric(r, "image_auroc", roc_auc_score)
        ax.plot(fpr, tpr, c=colour, lw=1.8, label=f"{r.model_name} (AUROC {auc:.3f})")
        op = operating_point(r)
        _mark_operating_point(ax, op["fpr"], op["tpr"], colour)
    return _curves_png(fig, ax, "lower right", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01),
                       xlabel="false-positive rate (good rejected)",
                       ylabel="true-positive rate (defects found)", title="ROC, image level")


def pr_png(results: Sequence[EvaluationResult]) -> bytes:
    """Precision-recall curve per model (AUPRC in the legend), operating point marked."""
    fig = _figure(5.6, 4.6)
    ax = fig.add_subplot()
    for r, y, s, colour in _curves(ax, results):
        precision, recall, _ = precision_recall_curve(y, s)
        ap = _metric(r, "image_auprc", average_precision_score)
        ax.plot(recall, precision, c=colour, lw=1.8, drawstyle="steps-post",
                label=f"{r.model_name} (AUPRC {ap:.3f})")
        ax.axhline(y.mean(), ls=":", c=colour, lw=1, alpha=0.6)
        op = operating_point(r)
        if np.isfinite(op["precision"]):
            _mark_operating_point(ax, op["tpr"], op["precision"], colour)
    return _curves_png(fig, ax, "lower left", xlim=(-0.01, 1.01), ylim=(-0.01, 1.03),
                       xlabel="recall (defects found)", ylabel="precision",
                       title="Precision-recall, image level (dotted: chance)")


def recall_frr_png(results: Sequence[EvaluationResult]) -> bytes:
    """Recall of defects against the share of good parts rejected, per model, on the test set
    (x axis linear to 1 %, logarithmic above, where the operating decisions are): the
    false-reject targets of the operating-point table (thresholds from the calibration goods)
    as open markers, the model's own threshold as a filled one."""
    fig = _figure(5.6, 4.6)
    ax = fig.add_subplot()
    for r, y, s, colour in _curves(ax, results):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(100 * fpr, tpr, c=colour, lw=1.8, label=f"{r.model_name}")
        at: dict[tuple[float, float], list[str]] = {}  # targets that land on the same point
        for p in r.operating_points:
            if np.isfinite(p.frr_test) and np.isfinite(p.recall):
                at.setdefault((100 * p.frr_test, p.recall), []).append(f"{100 * p.max_frr:g}")
        for (x, rec), names in at.items():
            ax.plot(x, rec, "s", mfc="none", mec=colour, ms=6, zorder=3)
            ax.annotate(", ".join(names) + " %", (x, rec), textcoords="offset points",
                        xytext=(5, -11), fontsize=6.5, color=colour)
        op = operating_point(r)
        _mark_operating_point(ax, 100 * op["fpr"], op["tpr"], colour)
    if any(r.operating_points for r in results):
        ax.plot([], [], "s", mfc="none", mec="black",
                label="false-reject target (threshold from good images)")
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
    ax.set_xticks([0, 0.5, 1, 2, 5, 10, 20, 50, 100])
    ax.set_xticklabels(["0", "0.5", "1", "2", "5", "10", "20", "50", "100"])
    return _curves_png(fig, ax, "lower right", xlim=(-0.05, 100.5), ylim=(-0.01, 1.03),
                       xlabel="good parts rejected on the test set (%)",
                       ylabel="recall (defects caught)",
                       title="Recall vs false-reject rate, image level")


def histogram_png(result: EvaluationResult, *, log: bool | None = None) -> bytes:
    """Score histogram of good vs defect images with the threshold as a vertical line.

    ``log``: log-scaled counts; by default when one class is over 10 times the other.
    """
    y, s = _labels_scores(result)
    good, bad = s[y == 0], s[y == 1]
    if log is None:
        small = max(min(good.size, bad.size), 1)
        log = max(good.size, bad.size) / small > 10
    lo, hi = float(np.min(np.r_[s, result.threshold])), float(np.max(np.r_[s, result.threshold]))
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    for values, colour, name in ((good, GOOD_COLOUR, "good"), (bad, DEFECT_COLOUR, "defect")):
        if values.size:
            ax.hist(values, bins=bins, color=colour, alpha=0.45, label=f"{name} ({values.size})")
            ax.hist(values, bins=bins, color=colour, histtype="step", lw=1.3)
    ax.axvline(result.threshold, c="black", ls="--", lw=1.3,
               label=f"threshold {result.threshold:.4g}")
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="anomaly score (higher = more abnormal)",
           ylabel="images" + (" (log)" if log else ""), title=f"{result.model_name}: scores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def map_range(maps: np.ndarray, max_values: int = 2_000_000) -> tuple[float, float]:
    """Shared colour scale of one model's anomaly maps: 1st to 99.9th percentile."""
    flat = np.asarray(maps, dtype=np.float64).ravel()
    flat = flat[:: max(1, flat.size // max_values)]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(flat, [1.0, 99.9]))
    return vmin, vmax if vmax > vmin else vmin + 1e-6


def statistic_png(
    name: str,
    values: np.ndarray,
    labels: np.ndarray,
    defect_types: Sequence[str],
    auroc: float,
    threshold: float | None = None,
) -> bytes:
    """Strip plot of one residual statistic: good images, then each defect type, jittered.

    ``auroc``: image AUROC of the statistic as a score (in the title). ``threshold``: the
    model's threshold in the statistic's units (drawn as a dashed line) when this statistic
    is the model's score rule.
    """
    v = np.asarray(values, dtype=np.float64)
    y = np.asarray(labels)
    types = np.asarray(defect_types, dtype=object)
    defect_names = sorted({str(t) for t, lab in zip(types, y) if lab == 1})
    groups = [("good", y == 0, GOOD_COLOUR)] + [
        (t, (y == 1) & (types == t), DEFECT_COLOUR) for t in defect_names]
    groups = [g for g in groups if g[1].any()]
    fig = _figure(4.2, 3.0)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # fixed jitter: the same report twice gives the same PNG
    for x, (_, member, colour) in enumerate(groups):
        pts = v[member]
        ax.scatter(x + rng.uniform(-0.25, 0.25, pts.size), pts, s=12, c=colour, alpha=0.6,
                   edgecolors="none")
        if pts.size:
            ax.plot([x - 0.32, x + 0.32], [np.median(pts)] * 2, c="black", lw=1.2)
    if threshold is not None and np.isfinite(threshold):
        ax.axhline(threshold, c="black", ls="--", lw=1.2, label=f"threshold {threshold:.4g}")
        ax.legend(fontsize=7, loc="best")
    ax.set_xticks(range(len(groups)), [f"{g}\n({int(m.sum())})" for g, m, _ in groups],
                  fontsize=7, rotation=30 if len(groups) > 4 else 0)
    ax.tick_params(axis="y", labelsize=7)
    auc = f"AUROC {auroc:.3f}" if np.isfinite(auroc) else "AUROC n/a (one class)"
    ax.set_title(f"{name}: {auc}", fontsize=9)
    ax.set_ylabel(f"residual {name}", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def residual_range(residuals: Sequence[np.ndarray]) -> float:
    """Shared symmetric colour limit of signed residual images: 99.9th percentile of |r|."""
    flat = np.concatenate([np.abs(np.asarray(r, dtype=np.float64)).ravel() for r in residuals]) \
        if len(residuals) else np.zeros(0)
    flat = flat[np.isfinite(flat)]
    limit = float(np.percentile(flat, 99.9)) if flat.size else 0.0
    return limit if limit > 0 else 1e-6


def residual_triplet_png(
    image: np.ndarray, reconstruction: np.ndarray, title: str, limit: float
) -> bytes:
    """Input, reconstruction and signed residual (input - reconstruction, mean over
    channels) of one image; float ``H x W x C`` in [0, 1]; residual colours in
    ``[-limit, limit]`` (red: brighter than reconstructed, blue: darker)."""
    fig = _figure(7.2, 2.9, layout=None)
    boxes = [(0.01, 0.03, 0.29, 0.74), (0.31, 0.03, 0.29, 0.74), (0.61, 0.03, 0.29, 0.74)]
    axes = [fig.add_axes(b) for b in boxes]
    gray = image.shape[2] == 1
    for ax, picture, name in zip(axes[:2], (image, reconstruction), ("input", "reconstruction"),
                                 strict=True):
        pic = np.clip(picture, 0.0, 1.0)
        ax.imshow(pic[:, :, 0] if gray else pic, cmap="gray" if gray else None, vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
    residual = (np.asarray(image, np.float64) - np.asarray(reconstruction, np.float64)).mean(2)
    heat = axes[2].imshow(residual, cmap="RdBu_r", vmin=-limit, vmax=limit)
    axes[2].set_title("residual (input - reconstruction)", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    cax = fig.add_axes((0.915, 0.08, 0.015, 0.64))
    fig.colorbar(heat, cax=cax).ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=8.5, y=0.985, va="top")
    return _png(fig)
