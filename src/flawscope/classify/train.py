"""K-fold training of the class + state classifier (the seed's Dacon pipeline).

Per fold: a timm backbone with pretrained weights (never a silent random fallback), stochastic
depth ``drop_path_rate`` for training, the chosen optimizer, cross-entropy, the augmentation
policy, and early stopping on the validation macro F1; the best epoch's weights and validation
probabilities (the out-of-fold predictions) are kept. ``folds=1`` trains one model on a single
stratified train / validation split (the first fold of ``round(1 / validation_fraction)``).

Reproducible and resumable: the epoch order, augmentation parameters and dropout seeds are
derived from (seed, fold, epoch), and after every epoch ``<checkpoint_dir>/fold{k}.pt`` holds
the model, optimizer, early-stopping state and best weights, so an interrupted run continues
where it stopped and ends with the same result.

Modules: :mod:`~flawscope.classify.config` (the options), :mod:`~flawscope.classify.folds`
(splits and one fold's training on :class:`flawscope.training.TrainLoop`),
:mod:`~flawscope.classify.distributed` (the process group); this module runs the folds and
assembles the model file.

Multi-process training: launched by ``torchrun`` (``WORLD_SIZE`` > 1) the same code uses
``DistributedDataParallel`` (gloo on CPU, NCCL on GPU). Every global batch is the same set of
images as in a one-process run, split into contiguous per-process slices; the loss is scaled
so that DDP's gradient averaging yields the gradient of the global batch mean; validation is
sharded and gathered, so every process takes the same early-stopping decisions. With a
BatchNorm model on GPU the BatchNorm layers are synchronised (``SyncBatchNorm``); on CPU they
are not (PyTorch's SyncBatchNorm needs a GPU) and per-process batch statistics make the result
differ slightly from a one-process run. Without BatchNorm and stochastic depth the results agree
up to floating-point rounding.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flawscope.backbones import backbone_normalization
from flawscope.classify.config import ClassifierConfig
from flawscope.classify.data import LabelTable, cached_pixels, channel_stats
from flawscope.classify.distributed import ProcessGroup, setup_distributed
from flawscope.classify.folds import FoldResult, FoldTrainer, fold_splits, new_model, train_fold
from flawscope.classify.metrics import classification_metrics
from flawscope.classify.model import Classifier
from flawscope.classify.tta import supported_tta
from flawscope.data.images import as_size
from flawscope.errors import DatasetError
from flawscope.io import atomic_write_text
from flawscope.training import TrainCheckpoint, config_fingerprint

__all__ = ["ClassifierConfig", "FitResult", "fit_classifier"]


@dataclass
class FitResult:
    """What :func:`fit_classifier` returns (on every process of a distributed run)."""

    classifier: Classifier
    table: LabelTable
    labels: list[str]
    oof_proba: np.ndarray  # N x labels; NaN rows for images never validated (folds=1)
    oof_fold: np.ndarray  # N; validation fold of each image, -1 if none
    metrics: dict[str, Any]  # out-of-fold metrics (classification_metrics)
    history: list[dict[str, Any]]
    fit_seconds: float
    train_images_per_second: float
    rank: int = 0
    folds: list[FoldResult] = field(default_factory=list)
    refits: list[FoldResult] = field(default_factory=list)  # models on every image (cfg.refit)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def refit(self) -> FoldResult | None:
        """The first model trained on every image (None without ``cfg.refit``)."""
        return self.refits[0] if self.refits else None


def member_name(k: int, n_folds: int) -> str:
    """Name of member ``k`` (its ``FoldResult.fold``) in the model file and of its checkpoint:
    ``fold{k}`` for the folds, then ``refit``, ``refit1`` ..."""
    r = k - n_folds
    return f"fold{k}" if r < 0 else "refit" if r == 0 else f"refit{r}"


def fit_classifier(
    table: LabelTable,
    config: ClassifierConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log_path: str | os.PathLike | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> FitResult:
    """Train the K fold models on ``table``; return the fold ensemble and out-of-fold results.

    ``output``: write the model file there. ``checkpoint_dir``: per-epoch checkpoints (resume
    with ``resume=True``). ``log_path``: one JSON line per epoch. ``on_epoch``: called with each
    epoch's record. ``extra_config``: more keys for the model file's configuration (e.g. the
    ``two_stage`` section of a defect-type classifier, :mod:`flawscope.twostage`). Under
    ``torchrun`` every process calls this; files are written by rank 0.
    """
    cfg = config or ClassifierConfig()
    cfg.validate()
    if len(table) == 0:
        raise DatasetError("no labelled images to train on (empty dataset)")
    labels = table.labels
    if len(labels) < 2:
        raise DatasetError(
            f"only one label ({labels[0]}) in the training data; a classifier needs at least two"
        )
    t_start = time.perf_counter()
    dist = setup_distributed(cfg.device)
    try:
        size = as_size(cfg.image_size)
        y = table.targets(labels)
        splits = fold_splits(y, cfg.folds, cfg.seed, cfg.validation_fraction)
        min_train = min(len(tr) for tr, _ in splits)
        if min_train < 2 * dist.world:
            raise DatasetError(
                f"{min_train} training images in a fold: too few for {dist.world} process(es)"
            )
        fingerprint = _fingerprint(table, cfg, labels, dist.world, size)
        # fail on missing pretrained weights before the (long) decoding: build fold 0's model
        prebuilt = None if resume else new_model(cfg, len(labels), 0)
        pixels = _decode(table, cfg, size, dist)
        if cfg.normalization == "data":
            mean, std = channel_stats(pixels)
        else:
            mean, std = (list(v) for v in backbone_normalization(cfg.backbone))
        flip_ok = cfg.augment.flip_allowed(table.classes, [it.label for it in table.items])
        trainer = FoldTrainer(cfg, dist, pixels, y, flip_ok, mean, std, len(labels))
        ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        log_file = Path(log_path) if log_path is not None else None
        _prepare_outputs(ckpt_dir, log_file, resume, dist)

        folds: list[FoldResult] = []
        for k, (train_idx, val_idx) in enumerate(splits):
            ckpt = (None if ckpt_dir is None else
                    TrainCheckpoint(ckpt_dir / f"fold{k}.pt", fingerprint, writer=dist.main))
            folds.append(train_fold(
                trainer, k, len(splits), train_idx, val_idx, checkpoint=ckpt, resume=resume,
                log_file=log_file, on_epoch=on_epoch, prebuilt=prebuilt if k == 0 else None,
            ))
            prebuilt = None
        refits: list[FoldResult] = []
        for r in range(cfg.refits if cfg.refit != "none" else 0):
            # member index after the folds: its own initial head, epoch order and augmentation
            k = len(splits) + r
            ckpt = (None if ckpt_dir is None else TrainCheckpoint(
                ckpt_dir / f"{member_name(k, len(splits))}.pt", fingerprint, writer=dist.main))
            refits.append(train_fold(
                trainer, k, len(splits), np.arange(len(y)),
                np.zeros(0, np.int64), checkpoint=ckpt, resume=resume, log_file=log_file,
                on_epoch=on_epoch,
            ))
        return _assemble(table, cfg, splits, folds, refits, (mean, std), dist, output=output,
                         t_start=t_start, extra_config=extra_config)
    finally:
        dist.close()


def _fingerprint(
    table: LabelTable, cfg: ClassifierConfig, labels: list[str], world: int,
    size: tuple[int, int],
) -> str:
    """The resume fingerprint: training options, labels, image list, process count, size."""
    data_id = hashlib.sha256(
        "\n".join(f"{it.path.resolve()}\t{it.label}" + (f"\t{list(it.box)}" if it.box else "")
                  for it in table.items).encode()
    ).hexdigest()
    return config_fingerprint(
        {"training": cfg.training_dict(), "labels": labels, "data": data_id,
         "world": world, "size": list(size)}
    )


def _decode(
    table: LabelTable, cfg: ClassifierConfig, size: tuple[int, int], dist: ProcessGroup
) -> np.ndarray:
    """Decode the images once: rank 0 builds the cache, the others then map it."""
    failure: Exception | None = None
    pixels: np.ndarray | None = None
    if dist.main:
        try:
            pixels = cached_pixels(table.paths, size, cfg.cache_dir, progress=cfg.progress,
                                   boxes=table.boxes)
        except Exception as exc:  # tell the other processes instead of leaving them waiting
            failure = exc
    if dist.all_sum([float(failure is not None)])[0] > 0:
        if failure is not None:
            raise failure
        raise DatasetError("decoding the images failed in process 0 (see its error)")
    if pixels is None:
        pixels = cached_pixels(table.paths, size, cfg.cache_dir, progress=False,
                               boxes=table.boxes)
    return pixels


def _prepare_outputs(
    ckpt_dir: Path | None, log_file: Path | None, resume: bool, dist: ProcessGroup
) -> None:
    """Without ``resume``: drop old fold and refit checkpoints and start an empty epoch log."""
    if dist.main:
        if ckpt_dir is not None:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                for old in [*ckpt_dir.glob("fold*.pt"), *ckpt_dir.glob("refit*.pt")]:
                    old.unlink()
        if log_file is not None and not resume:
            atomic_write_text(log_file, "")
    dist.barrier()


def _assemble(
    table: LabelTable,
    cfg: ClassifierConfig,
    splits: list[tuple[np.ndarray, np.ndarray]],
    folds: list[FoldResult],
    refits: list[FoldResult],
    normalization: tuple[list[float], list[float]],
    dist: ProcessGroup,
    *,
    output: str | os.PathLike | None,
    t_start: float,
    extra_config: dict[str, Any] | None = None,
) -> FitResult:
    """Out-of-fold results, the model file's configuration, the classifier (saved by rank 0):
    the fold models, the refit models, or both (``cfg.refit``)."""
    labels = table.labels
    y = table.targets(labels)
    mean, std = normalization
    n, n_labels = len(y), len(labels)
    oof = np.full((n, n_labels), np.nan, dtype=np.float32)
    oof_fold = np.full(n, -1, dtype=np.int64)
    for fold, (_, val_idx) in zip(folds, splits):
        oof[val_idx] = fold.val_proba.numpy()
        oof_fold[val_idx] = fold.fold
    trained = [*folds, *refits]
    history = [rec for run in trained for rec in run.history]
    train_images = sum(r["train_images_per_second"] * r["train_seconds"] for r in history)
    train_seconds = sum(r["train_seconds"] for r in history)
    members = {"none": folds, "replace": refits, "add": trained}[cfg.refit]
    seen = oof_fold >= 0
    metrics = classification_metrics(y[seen], oof[seen].argmax(1), labels)
    fit_seconds = time.perf_counter() - t_start
    model_config = {
        "labels": labels,
        "label_classes": {it.label: it.object_class for it in table.items},
        "backbone": cfg.backbone,
        "weight_source": folds[0].weight_source,
        "image_size": list(as_size(cfg.image_size)),
        "channels": 3,
        "mean": mean,
        "std": std,
        "normalization": cfg.normalization,
        "augment": cfg.augment.to_dict(),
        "pooling": cfg.pooling,
        "output_stride": cfg.output_stride,
        "tta": supported_tta(cfg.tta, cfg.augment.to_dict(), as_size(cfg.image_size)),
        "folds": cfg.folds,
        "fold_count": len(members),
        "members": [member_name(m.fold, len(splits)) for m in members],
        "training": cfg.training_dict(),
        "world_size": dist.world,
        "fold_results": [fold.summary() for fold in folds],
        "refit_result": refits[0].summary() if refits else None,
        "refit_results": [m.summary() for m in refits],
        "oof": {k: metrics[k] for k in ("macro_f1", "accuracy", "n", "per_label_f1")},
        "data": {"n_images": n, "counts": table.counts(), "sources": table.sources},
        "fit_seconds": fit_seconds,
        "history": history,
        **(extra_config or {}),
    }
    classifier = Classifier(model_config, [m.weights for m in members], dist.device)
    if output is not None and dist.main:
        classifier.save(output)
    dist.barrier()
    return FitResult(
        classifier, table, labels, oof, oof_fold, metrics, history, fit_seconds,
        train_images / max(train_seconds, 1e-9), dist.rank, folds, refits,
    )
