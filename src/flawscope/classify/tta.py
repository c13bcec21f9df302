"""Test-time augmentation (``--tta flips``) and prediction records shared by both runtimes.

``flips`` averages the ensemble's probabilities over the image and its flips - only the flips
the model was trained with (horizontal if its policy's ``hflip`` > 0, vertical if ``vflip`` > 0,
both together if both). ``dihedral`` adds the transposed image and its flips (the eight
symmetries of a square: quarter turns and mirror images) for a model trained with quarter turns
(``rot90``) and both flips. The per-class no-flip rule of design document 000 holds here too: an
image whose plain prediction belongs to a class (or label) in the model's ``no_flip_classes``
(e.g. ``metal_nut``, where a flip *is* the defect ``metal_nut-flip``) keeps its un-flipped
probabilities. The rule is read from the model file, so PyTorch and ONNX models agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flawscope.choices import TTA_MODES  # noqa: F401 - the modes, in their torch-free list
from flawscope.data.images import as_size
from flawscope.errors import ConfigError


def flip_views(augment: Mapping[str, Any]) -> list[tuple[bool, bool]]:
    """(horizontal, vertical) flips to average over, the identity first."""
    if not augment.get("enabled", True):
        return [(False, False)]
    h = float(augment.get("hflip", 0.0)) > 0
    v = float(augment.get("vflip", 0.0)) > 0
    views = [(False, False)]
    if h:
        views.append((True, False))
    if v:
        views.append((False, True))
    if h and v:
        views.append((True, True))
    return views


def class_of(label: str, label_classes: Mapping[str, str]) -> str:
    return label_classes.get(label) or label.partition("-")[0]


def no_flip_mask(
    labels: Sequence[str], label_classes: Mapping[str, str], no_flip: Sequence[str]
) -> np.ndarray:
    """Per label: is it excluded from flipping (its class or the label itself listed)?"""
    banned = set(no_flip)
    return np.array([lab in banned or class_of(lab, label_classes) in banned for lab in labels],
                    dtype=bool)


def tta_views(mode: str, augment: Mapping[str, Any]) -> list[tuple[bool, bool, bool]]:
    """(transpose, horizontal, vertical) views of ``mode``, the identity first."""
    if mode == "none":
        return [(False, False, False)]
    flips = [(False, h, v) for h, v in flip_views(augment)]
    if mode == "dihedral":
        return flips + [(True, h, v) for _, h, v in flips]
    return flips


def model_tta(mode: str | None, config: Mapping[str, Any]) -> str:
    """``mode``, or when None the model's own default (its ``tta``, recorded at fit time)."""
    return str(config.get("tta") or "none") if mode is None else mode


def check_tta(mode: str | None, config: Mapping[str, Any], where: str = "model") -> None:
    mode = model_tta(mode, config)
    if mode not in TTA_MODES:
        raise ConfigError(f"--tta {mode}: choose from {', '.join(TTA_MODES)}")
    augment = config.get("augment") or {}
    if mode != "none" and len(flip_views(augment)) == 1:
        raise ConfigError(
            f"--tta {mode}: {where} was trained without flips (its augmentation policy has "
            "hflip = vflip = 0 or is off); flipped images would be new to it"
        )
    if mode == "dihedral":
        h, w = as_size(config["image_size"])
        if len(flip_views(augment)) < 4 or not augment.get("rot90", False):
            raise ConfigError(
                f"--tta dihedral: {where} was not trained with quarter turns and both flips "
                "(its policy's rot90, hflip, vflip); use --tta flips"
            )
        if h != w:
            raise ConfigError(f"--tta dihedral: {where} takes {h}x{w} images, not square")


def tta_allowed(mode: str, config: Mapping[str, Any]) -> bool:
    """Can the model of ``config`` run test-time augmentation ``mode`` (:func:`check_tta`)?"""
    try:
        check_tta(mode, config)
    except ConfigError:
        return False
    return True


def supported_tta(mode: str, augment: Mapping[str, Any], size: tuple[int, int]) -> str:
    """``mode`` if a model trained with ``augment`` at ``size`` allows it, else the next
    weaker one (dihedral -> flips -> none): a recipe's default never makes a model unusable."""
    config = {"augment": augment, "image_size": list(size)}
    order = TTA_MODES[: TTA_MODES.index(mode) + 1][::-1]
    return next((m for m in order if tta_allowed(m, config)), "none")


def tta_proba(
    proba: Callable[[np.ndarray], np.ndarray],
    batch: np.ndarray,
    mode: str | None,
    config: Mapping[str, Any],
) -> np.ndarray:
    """Probabilities of the uint8 ``N x C x H x W`` ``batch`` under TTA ``mode`` (None: the
    model's default, :func:`model_tta`).

    ``proba`` maps a uint8 batch to ``N x labels`` probabilities; ``config`` is the model's
    configuration (``labels``, ``label_classes``, ``augment``, ``tta``).
    """
    mode = model_tta(mode, config)
    check_tta(mode, config)
    p0 = proba(batch)
    if mode == "none" or len(batch) == 0:
        return p0
    views = tta_views(mode, config.get("augment") or {})
    acc = p0.astype(np.float64)
    for t, h, v in views[1:]:
        x = batch.swapaxes(-1, -2) if t else batch
        x = x[..., ::-1] if h else x
        x = x[..., ::-1, :] if v else x
        acc = acc + proba(np.ascontiguousarray(x))
    avg = (acc / len(views)).astype(p0.dtype)
    augment = config.get("augment") or {}
    excluded = no_flip_mask(config["labels"], config.get("label_classes") or {},
                            augment.get("no_flip_classes", ()))
    keep_plain = excluded[p0.argmax(axis=1)]
    return np.where(keep_plain[:, None], p0, avg)


def prediction_records(
    proba: np.ndarray, labels: Sequence[str], label_classes: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One ``{"label", "class", "state", "probability"}`` per row of ``proba``."""
    out = []
    for row in proba:
        j = int(np.argmax(row))
        label = labels[j]
        cls = class_of(label, label_classes)
        state = label[len(cls) + 1:] if label.startswith(f"{cls}-") else label
        out.append({"label": label, "class": cls, "state": state,
                    "probability": float(row[j])})
    return out
