"""Evaluate an inspector on the test split of a dataset: image and pixel metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flawscope.data.dataset import Dataset, Sample
from flawscope.data.images import read_mask
from flawscope.errors import DatasetError
from flawscope.metrics import aupro, image_metrics, pixel_auroc
from flawscope.pipeline import Inspector


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

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=int)

    def per_type(self) -> dict[str, dict[str, float]]:
        """Detection rate per defect type (false-reject rate for ``good``)."""
        out: dict[str, dict[str, float]] = {}
        types = sorted({s.defect_type for s in self.samples})
        for t in types:
            idx = np.array([s.defect_type == t for s in self.samples])
            flagged = float(np.mean(self.scores[idx] > self.threshold))
            out[t] = {"n": int(idx.sum()), "flagged": flagged}
        return out


def evaluate(
    inspector: Inspector,
    dataset: Dataset,
    *,
    keep_maps: bool = True,
    samples: list[Sample] | None = None,
) -> EvaluationResult:
    """Score the test split of ``dataset`` and compute metrics.

    Pixel AUROC and AUPRO are computed at the model's input resolution when the dataset has
    defect masks (good images count as all-normal).
    """
    test = samples if samples is not None else dataset.test
    if not test:
        raise DatasetError(f"{dataset.root}: the test split is empty; nothing to evaluate")
    labels = np.array([s.label for s in test])
    t0 = time.perf_counter()
    scores, maps = inspector.score(test, with_maps=True)
    seconds = time.perf_counter() - t0
    metrics = image_metrics(labels, scores, inspector.threshold.value)
    metrics["images_per_second"] = len(test) / seconds if seconds > 0 else float("nan")
    masks = None
    if any(s.mask_path is not None for s in test):
        masks = np.stack([read_mask(s.mask_path, inspector.input_size) for s in test])
        metrics["pixel_auroc"] = pixel_auroc(masks, maps)
        metrics["aupro"] = aupro(masks, maps)
    return EvaluationResult(
        model_name=inspector.detector.model_name,
        samples=list(test),
        scores=scores,
        threshold=inspector.threshold.value,
        metrics=metrics,
        maps=maps if keep_maps else None,
        masks=masks,
        info={"threshold": inspector.threshold.to_dict(), **inspector.info},
    )
