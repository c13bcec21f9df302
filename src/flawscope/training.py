"""Training-loop helpers shared by the models: one epoch loop with early stopping, best
weights, history and resumable checkpoints (:class:`TrainLoop`), and progress bars.

A checkpoint is one file written atomically (temporary file + rename) with ``torch.save`` of
tensors and plain Python values only, read back with ``torch.load(weights_only=True)`` (no
pickle code runs), and stamped with a fingerprint of the run's configuration and data so that
``resume`` refuses a checkpoint of another run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from flawscope.errors import FlawscopeError
from flawscope.io import atomic_write

#: layout version of checkpoint files (a checkpoint of another layout is refused)
CHECKPOINT_FORMAT = 2


def config_fingerprint(config: dict[str, Any]) -> str:
    """Short hash of a JSON config: a checkpoint only resumes the run it belongs to."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without improving the monitored loss by ``min_delta``."""

    patience: int = 5
    min_delta: float = 0.0
    best: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[float] = field(default_factory=list)

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value``; True when it is a new best."""
        self.history.append(float(value))
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": list(self.history),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.history = [float(v) for v in state["history"]]


class TrainCheckpoint:
    """One run's checkpoint file: atomic writes, fingerprint-checked reads, no pickle.

    ``writer=False`` (the other processes of a distributed run) reads but never writes.
    """

    def __init__(self, path: str | Path, fingerprint: str, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.writer = writer

    def exists(self) -> bool:
        return self.path.exists()

    def write(self, contents: dict[str, Any]) -> None:
        if self.writer:
            payload = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, **contents}
            atomic_write(self.path, lambda p: torch.save(payload, p))

    def read(self) -> dict[str, Any]:
        """The checkpoint's contents; :class:`FlawscopeError` unless it belongs to this run."""
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or unsafe files
            raise FlawscopeError(
                f"{self.path}: cannot resume from this checkpoint ({exc})"
            ) from None
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            raise FlawscopeError(
                f"{self.path}: checkpoint belongs to a different training configuration or "
                "data; delete it or train without --resume"
            )
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise FlawscopeError(
                f"{self.path}: checkpoint written by another flawscope version (layout "
                f"{saved.get('format', 1)}, expected {CHECKPOINT_FORMAT}); delete it or train "
                "without --resume"
            )
        return saved


@dataclass
class Epoch:
    """What one epoch of training reports to :class:`TrainLoop`.

    ``record``: the history row (JSON values); ``monitor``: the early-stopping value, lower is
    better; ``keep``: tensors kept with the best weights (e.g. validation probabilities).
    """

    record: dict[str, Any]
    monitor: float
    keep: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TrainState:
    """The model-free part of a run: progress, early stopping, best weights, history."""

    stopper: EarlyStopping
    next_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_model: dict[str, torch.Tensor] | None = None
    best_keep: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    done: bool = False

    @property
    def best_epoch(self) -> int:
        return self.stopper.best_epoch

    @property
    def best_record(self) -> dict[str, Any]:
        """The history row of the best epoch."""
        return next(r for r in self.history if r["epoch"] == self.best_epoch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.next_epoch - 1, "done": self.done, "stopper": self.stopper.state(),
            "history": self.history, "best_model": self.best_model,
            "best_keep": self.best_keep, "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any], patience: int) -> TrainState:
        stopper = EarlyStopping(patience)
        stopper.load(saved["stopper"])
        return cls(
            stopper, int(saved["epoch"]) + 1, list(saved["history"]), saved["best_model"],
            dict(saved["best_keep"]), dict(saved["meta"]), bool(saved["done"]),
        )


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s state dict."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class TrainLoop:
    """The epoch loop of one model: early stopping, best weights, history, checkpoints.

    Every epoch ``step(epoch)`` trains and validates and returns an :class:`Epoch`; the loop
    feeds the early stopper, copies the weights of a new best epoch (and the epoch's ``keep``
    tensors), appends the record to the history and, with a ``checkpoint``, writes the model,
    optimiser, ``generator`` and (``torch_rng``) torch's global RNG state, so that
    :meth:`resume` continues an interrupted run to the same result. When the run ends the
    checkpoint is rewritten as ``done`` without model and optimiser. ``meta``: JSON values
    stored with the run. ``barrier``: called after each epoch's checkpoint (distributed runs,
    where only the writer process writes).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        patience: int,
        checkpoint: TrainCheckpoint | None = None,
        generator: torch.Generator | None = None,
        torch_rng: bool = False,
        meta: dict[str, Any] | None = None,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.epochs = epochs
        self.checkpoint = checkpoint
        self.generator, self.torch_rng = generator, torch_rng
        self.barrier = barrier or (lambda: None)
        self.state = TrainState(EarlyStopping(patience), meta=dict(meta or {}))
        self.resumed_from: int | None = None

    def resume(self, saved: dict[str, Any] | None = None) -> bool:
        """Continue from ``saved`` (default: the checkpoint, if it exists); True if resumed."""
        if saved is None:
            if self.checkpoint is None or not self.checkpoint.exists():
                return False
            saved = self.checkpoint.read()
        self.state = TrainState.from_dict(saved, self.state.stopper.patience)
        if not self.state.done:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.generator is not None:
                self.generator.set_state(saved["generator"])
            if self.torch_rng:
                torch.set_rng_state(saved["torch_rng"])
        self.resumed_from = self.state.next_epoch
        return True

    def run(
        self,
        step: Callable[[int], Epoch],
        *,
        report: Callable[[dict[str, Any], bool], None] | None = None,
        after: Callable[[dict[str, Any]], None] | None = None,
    ) -> TrainState:
        """Train the remaining epochs; load the best weights into the model; return the state.

        ``report(record, improved)`` runs after each epoch is recorded, before its checkpoint
        (logging); ``after(record)`` once the checkpoint is written (callbacks that may stop).
        """
        st = self.state
        for epoch in range(st.next_epoch, self.epochs):
            if st.done or st.stopper.should_stop:
                break
            out = step(epoch)
            improved = st.stopper.step(out.monitor, epoch)
            if improved or st.best_model is None:
                st.best_model = cpu_state(self.model)
                st.best_keep = {k: v.detach().cpu().clone() for k, v in out.keep.items()}
            st.history.append(out.record)
            st.next_epoch = epoch + 1
            if report is not None:
                report(out.record, improved)
            self._save()
            if after is not None:
                after(dict(out.record))
        if st.best_model is None:
            raise FlawscopeError("training ran no epoch")
        if not st.done:
            st.done = True
            self._save()
        self.model.load_state_dict(st.best_model)
        return st

    def _save(self) -> None:
        if self.checkpoint is not None:
            contents = self.state.to_dict()
            if not self.state.done:
                contents.update(
                    model=self.model.state_dict(), optimizer=self.optimizer.state_dict()
                )
                if self.generator is not None:
                    contents["generator"] = self.generator.get_state()
                if self.torch_rng:
                    contents["torch_rng"] = torch.get_rng_state()
            self.checkpoint.write(contents)
        self.barrier()


def progress_bar(
    total: int, desc: str, enabled: bool = True, leave: bool = False, unit: str = "img",
) -> tqdm:
    """A tqdm bar on a terminal, plain lines when stderr is a log or pipe (no bar frames):
    :func:`flawscope.progress.progress_bar`."""
    from flawscope.progress import progress_bar as _progress_bar

    return _progress_bar(total, desc, enabled, leave, unit)
