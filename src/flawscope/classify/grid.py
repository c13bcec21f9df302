"""The seed's ablation table on the user's data: one factor at a time from a base config.

Factors (as in the seed): ``backbone`` (e.g. B3 vs B4), ``cv`` (K-fold ensemble vs one
train / validation split), ``flip`` (no flips / all flips / flips except the excluded classes)
and ``optimizer`` (Adadelta, Adam, AdamW, RAdam, SGD). Every run is scored on the same
stratified hold-out split (default 20 %, never trained on), so a fold ensemble and a single
model are compared on the same images; the out-of-fold macro F1 is reported too. Runs that
change the optimizer use that optimizer's default learning rate.

Results go to ``OUT/grid.{md,csv,json}`` after every run, one JSON per run in ``OUT/runs/``;
with ``resume`` finished runs are read back and an interrupted one continues from its
checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flawscope.classify.config import OPTIMIZERS, ClassifierConfig
from flawscope.classify.data import LabelTable, cached_pixels
from flawscope.classify.folds import fold_splits
from flawscope.classify.metrics import classification_metrics, macro_f1
from flawscope.classify.model import Classifier
from flawscope.classify.train import fit_classifier, member_name
from flawscope.classify.tta import TTA_MODES, tta_allowed
from flawscope.errors import ConfigError
from flawscope.io import atomic_write_text
from flawscope.training import config_fingerprint

log = logging.getLogger(__name__)

FACTORS = ("backbone", "cv", "flip", "optimizer")
COLUMNS = (
    "run", "backbone", "folds", "flip", "optimizer", "tta", "test_macro_f1", "test_accuracy",
    "oof_macro_f1", "oof_accuracy", "fit_seconds", "predict_images_per_second",
)


@dataclass
class GridRun:
    """One experiment: a name, the factor it varies and the full config."""

    name: str
    factor: str
    value: str
    config: ClassifierConfig


def plan_grid(
    base: ClassifierConfig,
    *,
    backbones: Sequence[str] = (),
    folds: Sequence[int] = (1,),
    flip_policies: Sequence[str] = ("none", "all"),
    optimizers: Sequence[str] = ("adam", "adamw", "radam"),
    factors: Sequence[str] = FACTORS,
) -> list[GridRun]:
    """The base run, then each factor's other values (duplicates of the base left out)."""
    bad = sorted(set(factors) - set(FACTORS))
    if bad:
        raise ConfigError(f"--factors {','.join(bad)}: unknown; choose from {', '.join(FACTORS)}")
    for o in optimizers:
        if o.lower() not in OPTIMIZERS:
            raise ConfigError(f"--optimizers {o}: choose from {', '.join(OPTIMIZERS)}")
    runs = [GridRun("base", "base", "", base)]
    if "backbone" in factors:
        runs += [GridRun(f"backbone={b}", "backbone", b, base.replace(backbone=b))
                 for b in backbones if b != base.backbone]
    if "cv" in factors:
        runs += [GridRun(f"folds={k}", "cv", str(k), base.replace(folds=int(k)))
                 for k in folds if int(k) != base.folds]
    if "flip" in factors:
        for p in flip_policies:
            policy = base.augment.with_flip_policy(p)
            if policy != base.augment:
                runs.append(GridRun(f"flip={p}", "flip", p, base.replace(augment=policy)))
    if "optimizer" in factors:
        runs += [GridRun(f"optimizer={o.lower()}", "optimizer", o.lower(),
                         base.replace(optimizer=o.lower(), learning_rate=None, weight_decay=None))
                 for o in optimizers if o.lower() != base.optimizer]
    for r in runs:
        r.config.validate()
    return runs


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_grid(
    table: LabelTable,
    runs: Sequence[GridRun],
    out_dir: str | os.PathLike,
    *,
    holdout: float = 0.2,
    resume: bool = True,
    save_models: bool = False,
    variants: bool = True,
) -> list[dict[str, Any]]:
    """Run every experiment and write the table; returns one row per run. ``variants``: also
    score the other test-time augmentations and member sets of each run's trained models
    (``test_variants``; several more predictions of the hold-out per run)."""
    if not runs:
        raise ConfigError("no grid runs planned")
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"--holdout {holdout}: must be in [0, 1)")
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    labels = table.labels
    y = table.targets(labels)
    base = runs[0].config
    if holdout > 0:
        train_idx, test_idx = fold_splits(y, 1, base.seed, holdout)[0]
    else:
        train_idx, test_idx = np.arange(len(y)), np.zeros(0, dtype=np.int64)
    train, test = table.subset(train_idx), table.subset(test_idx)
    rows: list[dict[str, Any]] = []
    for i, run in enumerate(runs, 1):
        cfg = run.config
        key = config_fingerprint({"training": cfg.training_dict(), "holdout": holdout,
                                  "paths": [str(p) for p in table.paths], "labels": labels})
        result_file = out / "runs" / f"{_slug(run.name)}.json"
        if resume and result_file.is_file():
            row = json.loads(result_file.read_text(encoding="utf-8"))
            if row.get("fingerprint") == key:
                log.info("grid %d/%d %s: done earlier, read back", i, len(runs), run.name)
                rows.append(row)
                continue
        log.info("grid %d/%d: %s", i, len(runs), run.name)
        model_path = out / "models" / f"{_slug(run.name)}.safetensors" if save_models else None
        result = fit_classifier(
            train, cfg, output=model_path, checkpoint_dir=out / "checkpoints" / _slug(run.name),
            resume=resume, log_path=out / "runs" / f"{_slug(run.name)}.log.jsonl",
        )
        row = {
            "run": run.name, "factor": run.factor, "value": run.value,
            "backbone": cfg.backbone,
            "weights": (result.classifier.config.get("weight_source") or {}).get("kind"),
            "folds": cfg.folds, "flip": cfg.augment.flip_policy_name(),
            "optimizer": cfg.optimizer, "tta": result.classifier.config.get("tta", "none"),
            "image_size": cfg.image_size,
            "epochs": cfg.epochs, "oof_macro_f1": result.metrics["macro_f1"],
            "oof_accuracy": result.metrics["accuracy"],
            "oof_per_label_f1": result.metrics["per_label_f1"], "fit_seconds": result.fit_seconds,
            "train_images_per_second": result.train_images_per_second,
            "n_train": len(train), "n_test": len(test), "fingerprint": key,
        }
        if len(test):
            pixels = np.array(  # a writable copy (torch warns about read-only arrays)
                cached_pixels(test.paths, cfg.image_size, cfg.cache_dir, progress=False,
                              boxes=test.boxes))
            t0 = time.perf_counter()
            proba = result.classifier.predict_proba(pixels, cfg.eval_batch_size)
            row["predict_images_per_second"] = len(test) / max(time.perf_counter() - t0, 1e-9)
            y_test = test.targets(labels)
            m = classification_metrics(y_test, proba.argmax(1), labels)
            row.update(test_macro_f1=m["macro_f1"], test_accuracy=m["accuracy"],
                       test_per_label_f1=m["per_label_f1"],
                       test_confusion_matrix=m["confusion_matrix"])
            if variants:
                row["test_variants"] = _variants(result, pixels, y_test, proba, cfg)
        if result.is_main:
            atomic_write_text(result_file, json.dumps(row, indent=2))
            shutil.rmtree(out / "checkpoints" / _slug(run.name), ignore_errors=True)
        rows.append(row)
        if result.is_main:
            write_grid_files(out, rows)
    return rows


def _variants(
    result: Any, pixels: np.ndarray, y: np.ndarray, proba: np.ndarray, cfg: ClassifierConfig
) -> dict[str, float]:
    """Hold-out macro F1 of other choices on the same trained models (no retraining): each
    test-time augmentation the model allows, and with a refit the fold ensemble alone, the
    refit model alone and both averaged (each with every TTA). ``proba``: the model's own
    prediction (its members, its TTA), reused rather than computed again; so is every
    prediction of a member set that is the model's."""
    clf = result.classifier
    own = tuple(clf.config["members"])
    members: dict[str, list[Any]] = {"": []}
    if result.refits:
        members.update({"folds": result.folds, "refit": result.refits,
                        "folds+refit": [*result.folds, *result.refits]})
        if len(result.refits) > 1:
            members["refit0"] = result.refits[:1]
    ttas = [t for t in TTA_MODES if tta_allowed(t, clf.config)]
    computed = {(own, clf.config.get("tta", "none")): proba}
    out: dict[str, float] = {}
    for name, ms in members.items():
        names = tuple(member_name(m.fold, len(result.folds)) for m in ms) or own
        model = clf if names == own else Classifier(clf.config, [m.weights for m in ms],
                                                    clf.device)
        for tta in ttas:
            if (names, tta) not in computed:
                computed[names, tta] = model.predict_proba(pixels, cfg.eval_batch_size, tta=tta)
            out["+".join(x for x in (name, f"tta_{tta}") if x)] = macro_f1(
                y, computed[names, tta].argmax(1))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"
    return "" if v is None else str(v)


def format_grid_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table like the seed's (macro F1, accuracy, time per run)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_grid_files(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(out / "grid.md", format_grid_table(rows))
    atomic_write_text(out / "grid.json", json.dumps(list(rows), indent=2))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows([[_fmt(r.get(c)) for c in COLUMNS] for r in rows])
    atomic_write_text(out / "grid.csv", buf.getvalue())
