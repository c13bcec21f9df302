"""Base class of anomaly detectors (scikit-learn style).

Every option is an explicit ``__init__`` keyword stored under the same name; ``fit`` returns
``self``; learned state ends in ``_``. ``score`` gives one number per image, higher = more
abnormal, and an anomaly map per image. All inference goes through :meth:`inference_module`,
a plain ``nn.Module`` from raw ``uint8`` pixels (already resized) to ``(scores, maps)``, so the
Python path, the service and the ONNX export compute the same thing.
"""

from __future__ import annotations

import inspect
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from flawscope.data.images import as_size
from flawscope.data.source import ImageInput, iter_batches, native_channels
from flawscope.device import resolve_device
from flawscope.errors import ConfigError, FlawscopeError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NotFittedError(FlawscopeError):
    """The detector was used before ``fit``."""


class Detector(ABC):
    """Learns normal appearance from good images; scores new ones."""

    model_name: ClassVar[str] = ""
    #: values of options added after model files stored without them (what those files
    #: meant), filled in by :meth:`from_state`
    legacy_params: ClassVar[dict[str, Any]] = {}
    #: options that change nothing in the learned state (not stored as architecture)
    runtime_params: ClassVar[tuple[str, ...]] = ("device", "batch_size", "progress")
    #: True when ``fit`` learns from every good image it is given and leaves out-of-sample
    #: scores of (some of) them in ``calibration_scores_`` for the threshold; False when the
    #: caller must hold good images back for calibration
    self_calibrating: ClassVar[bool] = False

    def __init__(
        self,
        image_size: int | Sequence[int] = 256,
        channels: int | None = None,
        batch_size: int = 32,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.progress = progress

    # ------------------------------------------------------------------ parameters
    @classmethod
    def param_names(cls) -> list[str]:
        names: list[str] = []
        for klass in cls.__mro__:
            if klass is object:
                continue
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if name not in names:
                    names.append(name)
        return names

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names()}

    def validate(self) -> None:
        """Check the options; raises :class:`ConfigError` naming the option. Called by ``fit``
        (scikit-learn's contract: ``__init__`` and ``set_params`` only store) and by
        :func:`~flawscope.models.create`, so a bad option fails before any work."""
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"channels={self.channels}: expected 1 or 3")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r}: must be a positive integer")

    def set_params(self, **params: Any) -> Detector:
        """Change options by name (scikit-learn's contract); unknown names are refused.
        Takes effect at the next ``fit`` (which checks them); returns ``self``."""
        allowed = set(self.param_names())
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(f"{type(self).__name__}: unknown option(s) {', '.join(unknown)}; "
                              f"valid options: {', '.join(sorted(allowed))}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    # ------------------------------------------------------------------ contract
    @property
    def learns_from_defects(self) -> bool:
        """True when ``fit`` uses labelled defect images (a learned score rule)."""
        return False

    @property
    def score_is_map_max(self) -> bool:
        """True when the image score is the maximum of the anomaly map, so the map shares
        the score's threshold (heat-map colour scale, defect regions)."""
        return True

    def describe(self) -> dict[str, Any]:
        """What ``fit`` learned, for the training summary (JSON-able; empty by default)."""
        return {}

    @property
    def input_size(self) -> tuple[int, int]:
        """Resolution images are loaded at: the size ``fit`` resolved (``input_size_``, e.g.
        the photos' aspect ratio kept), else the configured one."""
        fitted = getattr(self, "input_size_", None)
        return tuple(fitted) if fitted is not None else self._configured_size()

    def _configured_size(self) -> tuple[int, int]:
        return as_size(self.image_size)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def _resolve_channels(self, images: ImageInput) -> int:
        if self.channels is None:
            return native_channels(images)
        if self.channels not in (1, 3):
            raise ConfigError(f"channels={self.channels}: expected 1 or 3")
        return self.channels

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "channels_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit first")

    # ------------------------------------------------------------------ training
    @abstractmethod
    def fit(
        self,
        images: ImageInput,
        *,
        validation: ImageInput | None = None,
        defects: ImageInput | None = None,
        checkpoint: str | Path | None = None,
        resume: bool = False,
    ) -> Detector:
        """Learn from good ``images``; returns ``self``.

        ``validation``: held-out good images (early stopping where the model trains).
        ``defects``: optional labelled defect images, used by score rules that learn.
        ``checkpoint``/``resume``: where to keep training state, and whether to continue.
        """

    # ------------------------------------------------------------------ inference
    @abstractmethod
    def inference_module(self) -> nn.Module:
        """``uint8 N x C x H x W`` (at :attr:`input_size`) -> ``(scores N, maps N x H x W)``."""

    def score(
        self, images: ImageInput, *, with_maps: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image scores (higher = more abnormal) and anomaly maps at the input size."""
        self._check_fitted()
        module = self.inference_module()
        dev = self.torch_device
        scores, maps = [], []
        with torch.inference_mode():
            for batch, _ in iter_batches(images, self.input_size, self.channels_, self.batch_size):
                s, m = module(torch.from_numpy(batch).to(dev))
                scores.append(s.float().cpu().numpy())
                if with_maps:
                    maps.append(m.float().cpu().numpy())
        h, w = self.input_size
        s_all = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        if not with_maps:
            return s_all, None
        m_all = np.concatenate(maps) if maps else np.zeros((0, h, w), np.float32)
        return s_all, m_all

    def decision_function(self, images: ImageInput) -> np.ndarray:
        """Image scores only (scikit-learn / PyOD name)."""
        return self.score(images, with_maps=False)[0]

    # ------------------------------------------------------------------ persistence
    def architecture(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted detector, as JSON (learned scalars too)."""
        params = {k: v for k, v in self.get_params().items() if k not in self.runtime_params}
        if isinstance(params.get("image_size"), tuple):
            params["image_size"] = list(params["image_size"])
        return {"params": params, "learned": self.learned_config()}

    def learned_config(self) -> dict[str, Any]:
        """JSON-able learned state (e.g. ``channels_``); tensors go to :meth:`state_tensors`."""
        return {"channels_": self.channels_}

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors to store in the model file."""

    @abstractmethod
    def load_state(self, learned: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore learned state from :meth:`learned_config` and :meth:`state_tensors`."""

    @classmethod
    def from_state(
        cls, architecture: dict[str, Any], tensors: dict[str, torch.Tensor], **runtime: Any
    ) -> Detector:
        det = cls(**{**cls.legacy_params, **architecture["params"]}, **runtime)
        det.load_state(architecture["learned"], tensors)
        return det
