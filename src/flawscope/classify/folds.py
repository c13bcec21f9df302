"""One fold of the classifier's K-fold training: splits, the per-epoch work, the fold loop.

Reproducible: the epoch order, augmentation parameters and dropout seeds are derived from
(seed, fold, epoch), and :class:`~flawscope.training.TrainLoop` keeps the fold's checkpoint
(model, optimizer, early stopping, best weights and their validation probabilities), so an
interrupted fold continues where it stopped and ends with the same result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import nn

from flawscope.backbones import create_backbone_model
from flawscope.classify.config import (
    ClassifierConfig,
    lr_factor,
    make_optimizer,
    network_kwargs,
)
from flawscope.classify.distributed import ProcessGroup
from flawscope.classify.metrics import macro_f1
from flawscope.errors import ConfigError, DatasetError
from flawscope.training import Epoch, TrainCheckpoint, TrainLoop, TrainState, progress_bar

log = logging.getLogger(__name__)


def seed_of(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


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


class FoldTrainer:
    """Batches, forward pass, one training epoch and validation; shared by the folds of a run."""

    def __init__(
        self,
        cfg: ClassifierConfig,
        dist: ProcessGroup,
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

    def epoch_order(self, train_idx: np.ndarray, gen: torch.Generator) -> np.ndarray:
        """Positions in ``train_idx`` for the epoch's slots: a permutation (``shuffle``) or,
        with ``balanced``, as many draws with replacement, every label equally likely."""
        n = len(train_idx)
        if self.cfg.sampler == "balanced":
            y = self.y[train_idx]
            counts = torch.bincount(y, minlength=self.n_labels).double()
            return torch.multinomial(1.0 / counts[y], n, replacement=True, generator=gen).numpy()
        return torch.randperm(n, generator=gen).numpy()

    def train_epoch(
        self, model: nn.Module, opt: torch.optim.Optimizer, train_idx: np.ndarray, gen_seed: int,
        desc: str, epoch: int = 0,
    ) -> dict[str, float]:
        cfg, dist = self.cfg, self.dist
        n_batches = max(1, math.ceil(len(train_idx) / cfg.batch_size))
        gen = torch.Generator().manual_seed(gen_seed)
        n = len(train_idx)
        perm = self.epoch_order(train_idx, gen)
        params = cfg.augment.sample(n, gen)  # per slot of the epoch
        weights = self.class_weights(train_idx)
        torch.manual_seed(seed_of(gen_seed, dist.rank))  # stochastic depth / dropout
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
                set_lr(opt, lr_factor(cfg.lr_schedule,
                                      (epoch + start // bs / n_batches) / cfg.epochs))
                slots = np.array_split(np.arange(start, start + m), dist.world)[dist.rank]
                idx = train_idx[perm[slots]]
                x = self.batch(idx)
                if not cfg.augment.is_identity:
                    x = cfg.augment.apply(x, params[slots], self.flip_ok[idx])
                target = self.y[idx].to(self.device)
                logits = self.forward(model, x)
                per_image = F.cross_entropy(logits, target, reduction="none",
                                            label_smoothing=cfg.label_smoothing)
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
            "lr": float(opt.param_groups[0]["lr"]),
            "frozen_body": bool(epoch < cfg.freeze_epochs),
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


def new_model(cfg: ClassifierConfig, n_labels: int, k: int) -> tuple[nn.Module, Any]:
    """Fold ``k``'s network with pretrained weights; the same fresh head on every process."""
    torch.manual_seed(seed_of(cfg.seed, "init", k))
    with warnings.catch_warnings():
        if k > 0:  # the random-weights warning is shown once, for fold 0
            warnings.simplefilter("ignore", UserWarning)
        model, source = create_backbone_model(
            cfg.backbone, weights=cfg.weights, num_classes=n_labels,
            drop_path_rate=cfg.drop_path_rate, **network_kwargs(cfg.pooling, cfg.output_stride),
        )
    _small_head(model)
    return model, source


def parameter_groups(model: nn.Module, backbone_lr_scale: float) -> Any:
    """The optimizer's parameters: with a scale other than 1, the pretrained body in a group
    that learns at ``backbone_lr_scale`` x the rate of the new head (:func:`make_optimizer`)."""
    if backbone_lr_scale == 1.0:
        return model.parameters()
    head = head_parameters(model)
    if not head:
        raise ConfigError("--backbone-lr-scale: this backbone has no separate classifier head")
    params = list(_unwrap(model).parameters())
    return [
        {"params": [p for p in params if id(p) in head]},
        {"params": [p for p in params if id(p) not in head], "lr_scale": backbone_lr_scale},
    ]


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


@dataclass
class FoldResult:
    """One fold's outcome: the best epoch's weights and validation probabilities, the history."""

    fold: int
    weights: dict[str, torch.Tensor]
    val_proba: torch.Tensor  # n_val x labels, at the best epoch
    history: list[dict[str, Any]]
    best_epoch: int
    weight_source: dict[str, Any]
    n_train: int
    n_val: int

    @classmethod
    def from_state(cls, fold: int, state: TrainState, n_train: int, n_val: int) -> FoldResult:
        return cls(
            fold, state.best_model or {}, state.best_keep["probs"], list(state.history),
            state.best_epoch, dict(state.meta["weight_source"]), n_train, n_val,
        )

    def summary(self) -> dict[str, Any]:
        """The fold's line of the model file's ``fold_results``."""
        best = next(r for r in self.history if r["epoch"] == self.best_epoch)
        return {
            "fold": self.fold, "best_epoch": self.best_epoch,
            "val_macro_f1": best["val_macro_f1"], "val_accuracy": best["val_accuracy"],
            "epochs_run": len(self.history), "n_train": self.n_train, "n_val": self.n_val,
        }


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Every parameter group's learning rate = its base rate (``initial_lr``) x ``factor``."""
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * factor


def head_parameters(model: nn.Module) -> set[int]:
    """``id`` of the parameters of the classifier head (timm's ``get_classifier()``)."""
    model = _unwrap(model)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    return {id(p) for p in head.parameters()}


def set_body_frozen(model: nn.Module, frozen: bool) -> None:
    """Head warm-up: stop (or restart) gradients of everything but the classifier head.

    Frozen parameters get no gradient, so the optimizer leaves them (and their state) alone
    and backpropagation stops at the head.
    """
    head = head_parameters(model)
    if frozen and not head:
        raise ConfigError("--freeze-epochs: this backbone has no separate classifier head")
    for p in _unwrap(model).parameters():
        p.requires_grad_(not frozen or id(p) in head)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _prepare_model(model: nn.Module, trainer: FoldTrainer, k: int) -> nn.Module:
    """On the training device (channels_last if asked); wrapped in DDP for several processes."""
    cfg, dist, device = trainer.cfg, trainer.dist, trainer.device
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.world == 1:
        return model
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif has_bn and k == 0 and dist.main:
        log.warning("BatchNorm statistics are per process on CPU (SyncBatchNorm needs a "
                    "GPU): results differ slightly from a one-process run")
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def train_fold(
    trainer: FoldTrainer,
    k: int,
    n_folds: int,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    checkpoint: TrainCheckpoint | None = None,
    resume: bool = False,
    log_file: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    prebuilt: tuple[nn.Module, Any] | None = None,
) -> FoldResult:
    """Train fold ``k`` (or continue / skip it from its checkpoint with ``resume``).

    An empty ``val_idx`` is the refit on every image: all epochs, no validation, the last
    epoch's weights kept.

    ``log_file``: one JSON line per epoch; ``on_epoch``: called with each epoch's record
    after its checkpoint; ``prebuilt``: the fold's (model, weight source) if already built.
    """
    cfg, dist = trainer.cfg, trainer.dist
    saved = checkpoint.read() if resume and checkpoint and checkpoint.exists() else None
    if saved is not None and saved["done"]:
        log.info("fold %d/%d: done in the checkpoint, skipped", k + 1, n_folds)
        state = TrainState.from_dict(saved, cfg.patience)
        return FoldResult.from_state(k, state, len(train_idx), len(val_idx))
    if cfg.freeze_epochs > 0 and dist.world > 1:
        raise ConfigError(
            f"--freeze-epochs {cfg.freeze_epochs}: head warm-up runs in one process only "
            "(pass --freeze-epochs 0 under torchrun)"
        )
    model, source = prebuilt or new_model(cfg, trainer.n_labels, k)
    model = _prepare_model(model, trainer, k)
    opt = make_optimizer(cfg.optimizer, parameter_groups(model, cfg.backbone_lr_scale),
                         cfg.learning_rate, cfg.weight_decay)
    loop = TrainLoop(
        _unwrap(model), opt, epochs=cfg.epochs, patience=cfg.patience, checkpoint=checkpoint,
        meta={"fold": k, "weight_source": source.to_dict()}, barrier=dist.barrier,
    )
    if saved is not None:
        loop.resume(saved)
        if dist.main:
            log.info("fold %d/%d: resuming at epoch %d", k + 1, n_folds, loop.resumed_from + 1)
    y_val = trainer.y[val_idx].numpy()
    refit = len(val_idx) == 0
    if not refit:
        name = f"fold {k + 1}/{n_folds}"
    else:  # the refits follow the folds: k = n_folds, n_folds + 1 ...
        name = "refit" if cfg.refits == 1 else f"refit {k - n_folds + 1}/{cfg.refits}"

    def step(epoch: int) -> Epoch:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"fold": k, "epoch": epoch}
        if cfg.freeze_epochs:
            set_body_frozen(model, epoch < cfg.freeze_epochs)
        rec.update(trainer.train_epoch(
            model, opt, train_idx, seed_of(cfg.seed, "epoch", k, epoch),
            f"{name} epoch {epoch + 1}/{cfg.epochs}", epoch,
        ))
        if not math.isfinite(rec["train_loss"]):
            raise ConfigError(
                f"{name} epoch {epoch}: training diverged (loss {rec['train_loss']}); "
                "try a smaller --lr or another --optimizer"
            )
        if refit:  # every image trained on: nothing to validate, each epoch supersedes the last
            rec.update(val_loss=None, val_macro_f1=None, val_accuracy=None,
                       seconds=time.perf_counter() - t0)
            return Epoch(rec, -float(epoch), {"probs": torch.zeros((0, trainer.n_labels))})
        probs = trainer.predict(model, val_idx)
        pred = probs.argmax(1).numpy()
        p_true = probs[torch.arange(len(val_idx)), torch.from_numpy(y_val)].clamp_min(1e-12)
        rec["val_loss"] = float(-p_true.log().mean())
        rec["val_macro_f1"] = macro_f1(y_val, pred)
        rec["val_accuracy"] = float((pred == y_val).mean())
        rec["seconds"] = time.perf_counter() - t0
        return Epoch(rec, -rec["val_macro_f1"], {"probs": probs})

    def report(rec: dict[str, Any], improved: bool) -> None:
        rec["best"] = bool(improved)
        if not dist.main:
            return
        val = ("" if refit else f", val macro F1 {rec['val_macro_f1']:.4f}, "
               f"acc {rec['val_accuracy']:.4f}{' *' if improved else ''}")
        log.info(
            "%s epoch %d/%d: loss %.4f%s (%.0f s, %.1f img/s)", name, rec["epoch"] + 1,
            cfg.epochs, rec["train_loss"], val, rec["seconds"], rec["train_images_per_second"],
        )
        if log_file is not None:
            with open(log_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

    state = loop.run(step, report=report, after=on_epoch)
    if cfg.freeze_epochs:
        set_body_frozen(model, False)
    return FoldResult.from_state(k, state, len(train_idx), len(val_idx))
