"""Training-loop helpers shared by the models: checkpoints, early stopping, progress bars."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flawscope.errors import FlawscopeError
from flawscope.modelfile import atomic_write


def config_fingerprint(config: dict[str, Any]) -> str:
    """Short hash of a JSON config: a checkpoint only resumes the run it belongs to."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a training checkpoint (tensors and plain Python values only)."""
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path, fingerprint: str) -> dict[str, Any]:
    """Load a checkpoint without executing code, and check it belongs to this run."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise FlawscopeError(f"{path}: cannot resume from this checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise FlawscopeError(
            f"{path}: checkpoint belongs to a different training configuration or data; "
            "delete it or train without --resume"
        )
    return state


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


def progress_bar(total: int, desc: str, enabled: bool = True, leave: bool = False) -> tqdm:
    return tqdm(
        total=total, desc=desc, disable=not enabled, leave=leave, file=sys.stderr,
        dynamic_ncols=True, unit="img",
    )
