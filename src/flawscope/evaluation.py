"""Evaluate an inspector on the test split of a dataset: image, pixel and region metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from flawscope.data.dataset import Dataset, Sample
from flawscope.data.images import read_mask
from flawscope.errors import ConfigError, DatasetError
from flawscope.metrics import (
    aupro,
    image_metrics,
    pixel_auroc,
    pixel_overlap,
    region_match,
    region_metrics,
)
from flawscope.operating import (
    FRR_TARGETS,
    OperatingPoint,
    f1_optimal_point,
    operating_points,
    recommendation,
)
from flawscope.pipeline import Inspector, decide, original_sizes
from flawscope.regions import Region, RegionRule
from flawscope.threshold import ScoreNormalization

if TYPE_CHECKING:  # runtime.py imports this module's users, not the other way round
    from flawscope.runtime import OnnxInspector


@dataclass
class EvaluationResult:
    """Scores, maps and metrics of one model on one test set (input of the report)."""

    model_name: str
    samples: list[Sample]
    scores: np.ndarray
    threshold: float
    metrics: dict[str, float]
    maps: np.ndarray | None = None  # N x H x W at the model's input size
    masks: np.ndarray | None = None  # N x H x W bool, where the dataset has masks
    info: dict[str, Any] = field(default_factory=dict)
    #: predicted defect regions per image (original-image pixels) and their masks (N x H x W
    #: bool at the map size; None when maps were not kept)
    regions: list[list[Region]] = field(default_factory=list)
    region_masks: np.ndarray | None = None
    #: "ok" / "defect" per image, from :func:`flawscope.pipeline.decide` (empty: derived from
    #: the scores and threshold the same way, for results made by hand)
    verdicts: list[str] = field(default_factory=list)
    pixel_threshold: float | None = None
    #: per-image pixel IoU and ground-truth regions found (datasets with masks)
    region_stats: list[dict[str, Any]] | None = None
    #: what a reader of the metrics must know: test FRR far above what the threshold
    #: guarantees, metrics undefined for a one-class test set
    warnings: list[str] = field(default_factory=list)
    #: autoencoders only: every residual statistic per test image (raw values, names of
    #: :data:`flawscope.residual.STATISTICS`), and the model's score rule
    statistics: dict[str, np.ndarray] | None = None
    score_rule: str | None = None
    #: autoencoders with maps kept: a few test images as the model saw them, index ->
    #: (input, reconstruction), float ``H x W x C`` in [0, 1] (see :func:`residual_examples`)
    reconstructions: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
    #: what each false-reject target would give (:mod:`flawscope.operating`): thresholds from
    #: the model's stored out-of-sample good scores, recall and FRR on this test set; empty
    #: for model files without calibration scores. ``f1_point``: the test set's F1-optimal
    #: threshold (a reference). ``model_frr``: the model's own false-reject target (None for
    #: the f1-optimal rule)
    operating_points: list[OperatingPoint] = field(default_factory=list)
    f1_point: OperatingPoint | None = None
    model_frr: float | None = None
    #: how the model's heat maps are coloured (:func:`flawscope.heatmap.scale_map`) and the
    #: score normalisation the ``score`` scale uses
    map_scale: str = "image"
    normalization: ScoreNormalization | None = None

    def recommendation(self, model: str = "MODEL") -> str | None:
        """One line when recall at the model's own target is low (see
        :func:`flawscope.operating.recommendation`), naming ``model`` in the command."""
        return recommendation(self.operating_points, self.model_frr, model)

    def operating_summary(self, model: str = "MODEL") -> dict[str, Any]:
        """The operating-point table as JSON-ready data."""
        return {"model_max_frr": self.model_frr,
                "points": [p.to_dict() for p in self.operating_points],
                "f1_optimal": self.f1_point.to_dict() if self.f1_point else None,
                "recommendation": self.recommendation(model)}

    def per_image(self) -> list[dict[str, Any]]:
        """One row per test image: path, label, score, verdict, regions and, where the
        dataset has masks, pixel IoU and ground-truth regions found."""
        rows = []
        verdicts = self.verdict_list()
        for i, s in enumerate(self.samples):
            regs = self.regions[i] if self.regions else []
            row: dict[str, Any] = {
                "path": str(s.path), "label": int(s.label), "defect_type": s.defect_type,
                "score": float(self.scores[i]),
                "verdict": verdicts[i],
                "n_regions": len(regs),
                "largest_region_area_px": max((r.area_px for r in regs), default=0),
            }
            if self.region_stats is not None:
                row.update(self.region_stats[i])
            rows.append(row)
        return rows

    def statistics_rows(self) -> list[dict[str, Any]]:
        """One row per test image: path, label, defect type, score and every residual
        statistic (raw, ``repr`` precision); raises ``ConfigError`` without statistics."""
        if self.statistics is None:
            raise ConfigError(f"model {self.model_name!r} has no residual statistics (only the "
                              "autoencoders ncae and conv-ae have them)")
        rows = []
        for i, s in enumerate(self.samples):
            row: dict[str, Any] = {"path": str(s.path), "label": int(s.label),
                                   "defect_type": s.defect_type,
                                   "score": repr(float(self.scores[i]))}
            row.update({k: repr(float(v[i])) for k, v in self.statistics.items()})
            rows.append(row)
        return rows

    def statistics_auroc(self) -> dict[str, float]:
        """Image AUROC of every residual statistic used as the score (oriented as the score
        rules: ``min`` negated), best first; NaN when the test set lacks a class."""
        from sklearn.metrics import roc_auc_score

        from flawscope.residual import LOWER_IS_ABNORMAL

        if not self.statistics:
            return {}
        y = self.labels
        both = bool((y == 0).any() and (y == 1).any())
        out = {}
        for name, values in self.statistics.items():
            v = np.asarray(values, dtype=np.float64)
            v = -v if name in LOWER_IS_ABNORMAL else v
            out[name] = (float(roc_auc_score(y, v)) if both and np.isfinite(v).all()
                         else float("nan"))
        return dict(sorted(out.items(), key=lambda kv: -kv[1] if np.isfinite(kv[1]) else 1.0))

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=int)

    def verdict_list(self) -> list[str]:
        """The verdict of every test image (as decided at evaluation)."""
        if self.verdicts:
            return list(self.verdicts)
        from flawscope.pipeline import decide

        return [decide(float(x), self.threshold)[0] for x in self.scores]

    def defect_flags(self) -> np.ndarray:
        """Boolean ``N``: the images judged defective."""
        return np.array([v == "defect" for v in self.verdict_list()], dtype=bool)

    def per_type(self) -> dict[str, dict[str, float]]:
        """Detection rate per defect type (false-reject rate for ``good``)."""
        out: dict[str, dict[str, float]] = {}
        types = sorted({s.defect_type for s in self.samples})
        defect = self.defect_flags()
        for t in types:
            idx = np.array([s.defect_type == t for s in self.samples])
            flagged = float(np.mean(defect[idx]))
            out[t] = {"n": int(idx.sum()), "flagged": flagged}
        return out


def evaluate(
    inspector: Inspector | OnnxInspector,
    dataset: Dataset,
    *,
    keep_maps: bool = True,
    samples: list[Sample] | None = None,
    rule: RegionRule | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Score the test split of ``dataset`` and compute metrics (a model file or an exported
    ``.onnx``; the export has no calibration scores, so no operating-point table).

    Pixel AUROC and AUPRO are computed at the model's input resolution when the dataset has
    defect masks (good images count as all-normal). Defect regions (``rule``, default the
    model's :meth:`~Inspector.region_rule`) are found for every image; with masks, their
    pixel F1/IoU and region-level F1 (:func:`~flawscope.metrics.region_metrics`: a
    ground-truth component is found at IoU >= 0.3) are added. ``progress``: a progress bar
    (images scored, with an estimate of the time left) on stderr.
    """
    test = samples if samples is not None else dataset.test
    if rule is None:
        rule = inspector.region_rule()
    if not test:
        raise DatasetError(f"{dataset.root}: the test split is empty; nothing to evaluate")
    labels = np.array([s.label for s in test])
    detector = inspector.detector
    with_stats = isinstance(detector, ResidualStatistics)
    t0 = time.perf_counter()
    scores, maps, stats = _score(inspector, test, with_stats, progress)
    seconds = time.perf_counter() - t0
    metrics = image_metrics(labels, scores, inspector.threshold.value)
    metrics["images_per_second"] = len(test) / seconds if seconds > 0 else float("nan")
    masks = None
    sizes = original_sizes(test)
    decided = [decide(float(x), inspector.threshold.value, m, rule, sz)
               for x, m, sz in zip(scores, maps, sizes)]  # verdict, regions, mask per image
    verdicts = [v for v, _, _ in decided]
    regions = [r for _, r, _ in decided]
    pred_masks = np.stack([mask for _, _, mask in decided])
    region_stats = None
    if any(s.mask_path is not None for s in test):
        masks = np.stack([read_mask(s.mask_path, inspector.input_size) for s in test])
        metrics["pixel_auroc"] = pixel_auroc(masks, maps)
        metrics["aupro"] = aupro(masks, maps)
        metrics.update(region_metrics(pred_masks, masks))
        region_stats = []
        for pm, gm in zip(pred_masks, masks):
            found = region_match(pm, gm)
            region_stats.append({"pixel_iou": pixel_overlap(pm, gm)["pixel_iou"],
                                 "gt_regions": found["n_regions_true"],
                                 "gt_regions_found": round(found["region_recall"]
                                                           * found["n_regions_true"])
                                 if found["n_regions_true"] else 0,
                                 "false_regions": found["n_regions_pred"]
                                 - round(found["region_precision"] * found["n_regions_pred"])
                                 if found["n_regions_pred"] else 0})
    metrics["pixel_threshold"] = rule.pixel_threshold
    warnings = _warnings(inspector, labels, np.array([v == "defect" for v in verdicts]))
    statistics = reconstructions = None
    if with_stats:
        from flawscope.residual import STATISTICS

        statistics = {name: stats[:, j] for j, name in enumerate(STATISTICS)}
        if keep_maps:
            idx = residual_examples(labels, scores)
            inputs, recons = detector.reconstruct([test[i] for i in idx])
            reconstructions = {int(i): (a, b) for i, a, b in zip(idx, inputs, recons)}
    model_frr = (inspector.threshold.max_frr if inspector.threshold.rule == "good-quantile"
                 else None)
    points: list[OperatingPoint] = []
    if inspector.calibration_scores is not None and len(inspector.calibration_scores):
        targets = sorted({*FRR_TARGETS, *([model_frr] if model_frr is not None else [])})
        points = operating_points(inspector.calibration_scores, scores, labels, targets)
    return EvaluationResult(
        operating_points=points,
        f1_point=f1_optimal_point(scores, labels),
        model_frr=model_frr,
        model_name=inspector.model_name,
        map_scale=inspector.map_scale,
        normalization=inspector.normalization,
        samples=list(test),
        scores=scores,
        threshold=inspector.threshold.value,
        metrics=metrics,
        maps=maps if keep_maps else None,
        masks=masks,
        info={"threshold": inspector.threshold.to_dict(), **inspector.info},
        regions=regions,
        region_masks=pred_masks if keep_maps else None,
        verdicts=verdicts,
        warnings=warnings,
        pixel_threshold=rule.pixel_threshold,
        region_stats=region_stats,
        statistics=statistics,
        score_rule=getattr(detector, "score_rule", None) if with_stats else None,
        reconstructions=reconstructions,
    )


#: images scored per call when a progress bar is shown (the detectors batch inside a call)
PROGRESS_CHUNK = 64


def _score(inspector: Inspector | OnnxInspector, test: list[Sample], with_stats: bool,
           progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scores, maps (and residual statistics) of ``test``; with ``progress``, in chunks of
    :data:`PROGRESS_CHUNK` images behind a progress bar."""
    from flawscope.progress import progress_bar

    detector = inspector.detector
    step = PROGRESS_CHUNK if progress else max(len(test), 1)
    scores, maps, stats = [], [], []
    with progress_bar(len(test), "scoring test images", progress) as bar:
        for start in range(0, len(test), step):
            part = test[start : start + step]
            if with_stats:
                s, m, st = detector.score_with_statistics(part, with_maps=True)
                stats.append(st)
            else:
                s, m = inspector.score(part, with_maps=True)
            scores.append(np.asarray(s))
            maps.append(np.asarray(m))
            bar.update(len(part))
    if len(scores) == 1:
        return scores[0], maps[0], stats[0] if stats else None
    return (np.concatenate(scores), np.concatenate(maps),
            np.concatenate(stats) if stats else None)


@runtime_checkable
class ResidualStatistics(Protocol):
    """A detector with residual statistics and reconstructions (the autoencoders)."""

    def score_with_statistics(
        self, images: Any, *, with_maps: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]: ...

    def reconstruct(self, images: Any) -> tuple[np.ndarray, np.ndarray]: ...


def residual_examples(labels: np.ndarray, scores: np.ndarray, n: int = 2) -> list[int]:
    """Indices of the test images whose residuals the report shows: the ``n`` highest- and
    ``n`` lowest-scoring defects and the highest-scoring good image (no repeats)."""
    s = np.asarray(scores, dtype=np.float64)
    defects = np.flatnonzero(labels == 1)
    goods = np.flatnonzero(labels == 0)
    by_score = defects[np.argsort(-s[defects], kind="stable")]
    picked = [*by_score[:n], *by_score[::-1][:n]]
    if goods.size:
        picked.append(goods[np.argmax(s[goods])])
    return list(dict.fromkeys(int(i) for i in picked))


def _warnings(inspector: Inspector | OnnxInspector, labels: np.ndarray, defect: np.ndarray
              ) -> list[str]:
    out = []
    n_good, n_defect = int((labels == 0).sum()), int((labels == 1).sum())
    if n_good == 0 or n_defect == 0:
        only = "defect" if n_good == 0 else "good"
        out.append(f"warning: the test set has only {only} images, so image AUROC, AUPRC and "
                   "F1 are undefined (nan); add "
                   f"{'good' if n_good == 0 else 'defect'} images to measure them")
    rejected = int(defect[labels == 0].sum())
    frr = inspector.threshold.frr_warning(rejected, n_good)
    if frr:
        out.append(frr)
    return out
