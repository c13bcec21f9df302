"""Fold-ensemble prediction, submission files, evaluation and out-of-fold tables.

Submission files: ``index,label`` (the Dacon form) and a variant
``index,file_name,label,confidence``. ``index`` is the CSV's ``index`` column when the input is
a CSV that has one, else the row number (0, 1, ...) in input order.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flawscope.classify.data import LabelTable, read_label_csv
from flawscope.classify.metrics import classification_metrics
from flawscope.classify.model import Classifier
from flawscope.classify.tta import check_tta
from flawscope.data.images import expand_images, load_images
from flawscope.io import atomic_write_text


@dataclass
class PredictionInput:
    """Images to predict, with their submission index and file name."""

    paths: list[Path]
    index: list[str]
    file_names: list[str]
    table: LabelTable | None = None  # the CSV rows, when the input is a CSV


def prediction_inputs(
    items: Sequence[str | os.PathLike], image_dir: str | os.PathLike | None = None
) -> PredictionInput:
    """A CSV (``file_name`` column, optional ``index``) or image files / folders."""
    if len(items) == 1 and str(items[0]).lower().endswith(".csv"):
        table = read_label_csv(items[0], image_dir, require_labels=False)
        index = [it.index if it.index is not None else str(i) for i, it in enumerate(table.items)]
        names = [it.file_name or str(it.path) for it in table.items]
        return PredictionInput(table.paths, index, names, table)
    paths = expand_images(items)
    return PredictionInput(paths, [str(i) for i in range(len(paths))], [str(p) for p in paths])


@dataclass
class Predictions:
    """Ensemble output for the images that could be read."""

    proba: np.ndarray  # N x labels
    labels: list[str]  # predicted label per kept image
    kept: np.ndarray  # indices into the input list
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    images_per_second: float = float("nan")

    @property
    def confidence(self) -> np.ndarray:
        return self.proba.max(axis=1) if len(self.proba) else np.zeros(0)


def predict_paths(
    classifier: Any, paths: Sequence[Path], batch_size: int = 64, skip_bad: bool = False,
    tta: str | None = None,
) -> Predictions:
    """Decode (per batch) and predict; unreadable files raise, or are listed with ``skip_bad``.

    ``classifier``: a :class:`Classifier` or an
    :class:`~flawscope.classify.export.OnnxClassifier`; ``tta``: ``none``, ``flips``,
    ``dihedral`` or None (the model's default).
    """
    check_tta(tta, classifier.config)
    t0 = time.perf_counter()
    probs, kept, skipped = [], [], []
    for start in range(0, len(paths), batch_size):
        part = list(paths[start : start + batch_size])
        loaded = load_images(part, classifier.image_size, 3, skip_bad=skip_bad)
        skipped += loaded.skipped
        bad = {p for p, _ in loaded.skipped}
        kept += [start + i for i, p in enumerate(part) if p not in bad]
        if len(loaded):
            probs.append(classifier.proba_from_uint8(loaded.pixels, tta))
    n_labels = len(classifier.labels)
    proba = np.concatenate(probs) if probs else np.zeros((0, n_labels), np.float32)
    names = [classifier.labels[i] for i in proba.argmax(axis=1)] if len(proba) else []
    ips = len(kept) / max(time.perf_counter() - t0, 1e-9)
    return Predictions(proba, names, np.asarray(kept, dtype=np.int64), skipped, ips)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def variant_path(path: str | os.PathLike) -> Path:
    """``submission.csv`` -> ``submission_files.csv`` (the variant with file names)."""
    p = Path(path)
    return p.with_name(f"{p.stem}_files{p.suffix or '.csv'}")


def write_submission(
    path: str | os.PathLike, inputs: PredictionInput, preds: Predictions
) -> tuple[Path, Path]:
    """Write ``index,label`` to ``path`` and ``index,file_name,label,confidence`` beside it."""
    idx = [inputs.index[i] for i in preds.kept]
    names = [inputs.file_names[i] for i in preds.kept]
    main = atomic_write_text(path, _csv_text(["index", "label"], list(zip(idx, preds.labels))))
    rows = [
        [i, n, lab, f"{c:.6f}"]
        for i, n, lab, c in zip(idx, names, preds.labels, preds.confidence)
    ]
    variant = atomic_write_text(
        variant_path(path), _csv_text(["index", "file_name", "label", "confidence"], rows)
    )
    return main, variant


def evaluate_classifier(
    classifier: Classifier, table: LabelTable, batch_size: int = 64, tta: str | None = None
) -> dict[str, Any]:
    """Metrics of the ensemble on labelled images (labels must be in the model's space)."""
    y = table.targets(classifier.labels)
    preds = predict_paths(classifier, table.paths, batch_size, tta=tta)
    out = classification_metrics(y, preds.proba.argmax(axis=1), classifier.labels)
    out["images_per_second"] = preds.images_per_second
    return out


def write_oof_csv(path: str | os.PathLike, result: Any) -> Path:
    """Out-of-fold table of a :class:`~flawscope.classify.train.FitResult`: path, label,
    fold, prediction, confidence and one probability column per label (``p:<label>``)."""
    labels = result.labels
    rows = []
    for it, fold, p in zip(result.table.items, result.oof_fold, result.oof_proba):
        if fold < 0:
            rows.append([str(it.path), it.label, -1, "", "", *[""] * len(labels)])
            continue
        j = int(np.argmax(p))
        rows.append([str(it.path), it.label, int(fold), labels[j], f"{p[j]:.6f}",
                     *[f"{v:.6f}" for v in p]])
    header = ["path", "label", "fold", "prediction", "confidence", *[f"p:{lab}" for lab in labels]]
    return atomic_write_text(path, _csv_text(header, rows))
