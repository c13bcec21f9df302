"""Training augmentation as data: a policy object, loadable from JSON or CLI options.

The seed's augmentation was ``RandomAffine(+-45 deg)``, ``RandomRotation(0..80)``, random
vertical and horizontal flips, with flips switched off for ``metal_nut`` (a flipped nut is
the defect ``metal_nut-flip``). :class:`AugmentPolicy` holds exactly that, with the per-class
exclusion as a list of class names (or full labels), e.g.::

    {"affine_degrees": 45, "rotation": [0, 80], "hflip": 0.5, "vflip": 0.5,
     "no_flip_classes": ["metal_nut"]}

Augmentation runs on whole batches of normalised tensors: every image's rotation, flips,
shift and scale become one 2 x 3 matrix and the batch is resampled by a single
``affine_grid`` + ``grid_sample`` (bilinear, zero padding = the mean colour after
normalisation, as in the seed where ``Normalize`` came first). The random parameters of an
epoch are drawn for all images at once from a seeded generator (:meth:`AugmentPolicy.sample`),
so they depend on the image's position in the epoch only, not on the process that handles it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flawscope.errors import ConfigError

FLIP_POLICIES = ("none", "all", "except")
# columns of the parameter tensor returned by AugmentPolicy.sample
_ANGLE, _HFLIP, _VFLIP, _TX, _TY, _SCALE = range(6)


def _pair(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return (-abs(float(value)), abs(float(value)))
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"augmentation {name}={value!r}: expected a number or [min, max]"
        ) from None
    if lo > hi:
        raise ConfigError(f"augmentation {name}={value!r}: min is larger than max")
    return lo, hi


@dataclass(frozen=True)
class AugmentPolicy:
    """Random affine augmentation with per-class flip exclusions (defaults: the seed's).

    ``affine_degrees``: rotation uniformly in +-degrees (``RandomAffine``); ``rotation``: a
    second rotation in [min, max] degrees (``RandomRotation``); ``rot90``: also turn by a
    random multiple of 90 degrees (lossless on square images); the angles add up. ``hflip`` /
    ``vflip``: probabilities. ``translate``: largest shift as a fraction of the image side;
    ``scale``: [min, max] zoom. ``no_flip_classes``: object classes (or full labels) never
    flipped. ``enabled=False`` turns everything off.
    """

    affine_degrees: float = 45.0
    rotation: tuple[float, float] = (0.0, 80.0)
    hflip: float = 0.5
    vflip: float = 0.5
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    no_flip_classes: tuple[str, ...] = ("metal_nut",)
    rot90: bool = False
    enabled: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotation", _pair("rotation", self.rotation))
        object.__setattr__(self, "scale", _pair("scale", self.scale))
        object.__setattr__(self, "no_flip_classes", tuple(str(c) for c in self.no_flip_classes))
        for name in ("hflip", "vflip"):
            p = float(getattr(self, name))
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"augmentation {name}={p}: a probability in [0, 1]")
            object.__setattr__(self, name, p)
        if not 0.0 <= float(self.translate) < 1.0:
            raise ConfigError(f"augmentation translate={self.translate}: in [0, 1)")
        if self.scale[0] <= 0:
            raise ConfigError(f"augmentation scale={list(self.scale)}: must be positive")
        object.__setattr__(self, "affine_degrees", abs(float(self.affine_degrees)))
        object.__setattr__(self, "translate", float(self.translate))
        object.__setattr__(self, "enabled", bool(self.enabled))
        object.__setattr__(self, "rot90", bool(self.rot90))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rotation"], d["scale"] = list(self.rotation), list(self.scale)
        d["no_flip_classes"] = list(self.no_flip_classes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "augmentation policy") -> AugmentPolicy:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AugmentPolicy:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--augment {path}: no such file") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--augment {path}: not a JSON file ({exc})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"--augment {path}: expected a JSON object")
        return cls.from_dict(d, where=str(path))

    @classmethod
    def from_spec(cls, spec: str | os.PathLike) -> AugmentPolicy:
        """A preset name (:data:`PRESETS`: ``document``, ``dihedral``, ``flips``, ``none``) or a
        JSON file.

        ``seed`` (the old name of ``document``, easily confused with ``--seed``) still works
        and warns.
        """
        if str(spec) in _DEPRECATED_PRESETS:
            new = _DEPRECATED_PRESETS[str(spec)]
            warnings.warn(
                f"--augment {spec} is deprecated: it is now called --augment {new}",
                FutureWarning, stacklevel=2,
            )
            spec = new
        if str(spec) in PRESETS:
            return PRESETS[str(spec)]
        return cls.from_file(spec)

    def with_flip_policy(self, policy: str) -> AugmentPolicy:
        """``none``: no flips; ``all``: flips for every class; ``except``: as configured."""
        if policy == "none":
            return replace(self, hflip=0.0, vflip=0.0)
        if policy == "all":
            return replace(self, no_flip_classes=())
        if policy == "except":
            return self
        raise ConfigError(f"flip policy {policy!r}: choose from {', '.join(FLIP_POLICIES)}")

    def flip_policy_name(self) -> str:
        if self.hflip == 0 and self.vflip == 0:
            return "none"
        if not self.no_flip_classes:
            return "all"
        return "except " + ",".join(self.no_flip_classes)

    # ------------------------------------------------------------------ application
    def flip_allowed(self, classes: Sequence[str], labels: Sequence[str]) -> np.ndarray:
        """Per image: may it be flipped (its class and label are not excluded)?"""
        banned = set(self.no_flip_classes)
        return np.array(
            [c not in banned and lab not in banned for c, lab in zip(classes, labels)], dtype=bool
        )

    @property
    def is_identity(self) -> bool:
        return not self.enabled or (
            self.affine_degrees == 0
            and self.rotation == (0.0, 0.0)
            and not self.rot90
            and self.hflip == 0
            and self.vflip == 0
            and self.translate == 0
            and self.scale == (1.0, 1.0)
        )

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Random parameters for ``n`` images: ``n x 6`` (angle, hflip, vflip, tx, ty, scale)."""
        u = torch.rand(n, 8, generator=generator, dtype=torch.float64)
        angle = (u[:, 0] * 2 - 1) * self.affine_degrees
        angle += self.rotation[0] + u[:, 1] * (self.rotation[1] - self.rotation[0])
        if self.rot90:
            angle += 90.0 * torch.floor(u[:, 7] * 4).clamp(max=3)
        hflip = (u[:, 2] < self.hflip).double()
        vflip = (u[:, 3] < self.vflip).double()
        tx = (u[:, 4] * 2 - 1) * self.translate
        ty = (u[:, 5] * 2 - 1) * self.translate
        scale = self.scale[0] + u[:, 6] * (self.scale[1] - self.scale[0])
        return torch.stack([angle, hflip, vflip, tx, ty, scale], dim=1).float()

    def apply(
        self, x: torch.Tensor, params: torch.Tensor, flip_ok: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Augment a float batch ``N x C x H x W`` with parameters from :meth:`sample`.

        ``flip_ok`` (bool, N) masks the flips of excluded classes.
        """
        if self.is_identity or len(x) == 0:
            return x
        return apply_affine(x, params.to(x.device), flip_ok)


#: named policies: the design document's ("Seed 000"); flips and quarter turns only (every
#: pixel kept, for parts whose defects sit at the border, e.g. magnetic tile breaks); flips only
#: (the part keeps its orientation: fixtured lines, elongated parts); none
PRESETS: dict[str, AugmentPolicy] = {
    "document": AugmentPolicy(),
    "dihedral": AugmentPolicy(affine_degrees=0.0, rotation=(0.0, 0.0), rot90=True),
    "flips": AugmentPolicy(affine_degrees=0.0, rotation=(0.0, 0.0)),
    "none": AugmentPolicy(enabled=False),
}
#: old preset names (still accepted, with a warning)
_DEPRECATED_PRESETS = {"seed": "document"}


def affine_matrices(params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``N x 2 x 3`` sampling matrices (output -> input, normalised coordinates).

    Forward map in pixel coordinates about the centre: flip, then rotate counter-clockwise by
    ``angle`` and scale, then shift by (tx, ty) x image side.
    """
    p = params.double()
    a = p[:, _ANGLE] * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    fx = 1.0 - 2.0 * p[:, _HFLIP]
    fy = 1.0 - 2.0 * p[:, _VFLIP]
    s = p[:, _SCALE]
    # inverse of (rotation R(angle) . scale): R(-angle) / s, in pixel units (y down, so a
    # counter-clockwise turn on screen is the matrix [[cos, sin], [-sin, cos]])
    inv = torch.stack(
        [torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], dim=-2
    ) / s[:, None, None]
    flip = torch.diag_embed(torch.stack([fx, fy], -1))
    m = flip @ inv  # pixel-unit inverse map: p_in = F R^-1 (p_out - t) / s
    d = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64, device=p.device)
    theta = m * d[None, None, :] / d[None, :, None]  # D^-1 M D
    shift = torch.stack([p[:, _TX] * width, p[:, _TY] * height], -1)
    offset = -(m @ shift[:, :, None])[:, :, 0] / d
    return torch.cat([theta, offset[:, :, None]], dim=2)


def apply_affine(
    x: torch.Tensor, params: torch.Tensor, flip_ok: torch.Tensor | None = None
) -> torch.Tensor:
    """Resample ``x`` by the per-image affine maps of ``params`` (see :func:`affine_matrices`)."""
    params = params.clone()
    if flip_ok is not None:
        keep = flip_ok.to(params.device, torch.bool)
        params[:, _HFLIP] = torch.where(keep, params[:, _HFLIP], 0.0)
        params[:, _VFLIP] = torch.where(keep, params[:, _VFLIP], 0.0)
    n, _, h, w = x.shape
    theta = affine_matrices(params, h, w).to(x.dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
