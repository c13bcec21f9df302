"""Anomaly heatmaps as PNG: a colormap lookup table applied with numpy (no pyplot).

Scale: with ``scale="score"`` (the image score is the maximum of the map) the colour is
``0.5 * value / threshold``: 0 for no anomaly, the middle of the colormap exactly at the
decision threshold, the top at twice the threshold, the same for every image, so heatmaps
compare (maps with negative values or a non-positive threshold go through the model's
:class:`~flawscope.threshold.ScoreNormalization` instead, which also puts the threshold at 0.5).
With ``scale="image"`` each map is stretched to its own range (relative heatmap).

The heatmap is RGBA: colour from the colormap, opacity growing with the anomaly, so it can be
laid over the image; values below :data:`TRANSPARENT_BELOW` (a fifth of the threshold on the
score scale) are fully transparent, so the part itself stays visible where nothing is wrong.
:func:`overlay_png` blends it into the image itself and can draw defect-region outlines
(:func:`draw_outlines`: the region mask minus its erosion).
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from flawscope.threshold import ScoreNormalization

COLORMAP = "turbo"
ALPHA_MIN, ALPHA_MAX = 0.10, 0.85  # overlay opacity at colour 0 and colour 1
#: scaled values below this are transparent (0.1 = a fifth of the threshold's 0.5)
TRANSPARENT_BELOW = 0.1
#: colour of region outlines (magenta: not in the turbo colormap)
OUTLINE_COLOR = (255, 0, 255)


@lru_cache(maxsize=4)
def colormap_lut(name: str = COLORMAP) -> np.ndarray:
    """``256 x 3`` uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def scale_map(
    amap: np.ndarray, scale: str = "score", normalization: ScoreNormalization | None = None
) -> np.ndarray:
    """Anomaly map -> values in [0, 1] (see the module docstring for ``scale``)."""
    amap = np.nan_to_num(np.asarray(amap, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if scale == "score" and normalization is not None:
        t = normalization.threshold
        if t > 0 and float(amap.min(initial=0.0)) >= 0:
            return np.clip(0.5 * amap / t, 0.0, 1.0)
        return normalization(amap)
    if amap.size == 0:
        return amap
    lo, hi = float(amap.min()), float(amap.max())
    return (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)


def heatmap_rgba(values: np.ndarray, cmap: str = COLORMAP) -> np.ndarray:
    """``H x W`` values in [0, 1] -> ``H x W x 4`` uint8 (colormap colour, rising opacity)."""
    idx = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    rgba = np.empty((*values.shape, 4), np.uint8)
    rgba[..., :3] = colormap_lut(cmap)[idx]
    alpha = np.rint(255 * (ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) * idx / 255.0))
    rgba[..., 3] = np.where(np.asarray(values) < TRANSPARENT_BELOW, 0, alpha)
    return rgba


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask: ``mask XOR erosion(mask)`` (``width`` pixels)."""
    mask = np.asarray(mask, dtype=bool)
    if width < 1 or not mask.any():
        return np.zeros_like(mask)
    return mask ^ ndimage.binary_erosion(mask, iterations=width, border_value=0)


def draw_outlines(
    rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OUTLINE_COLOR,
    width: int = 1,
) -> np.ndarray:
    """A copy of ``rgb`` (uint8 ``H x W x 3``) with the outline of ``mask`` (``H x W`` bool,
    e.g. :func:`flawscope.regions.region_mask`) drawn in ``color``."""
    if rgb.shape[:2] != np.shape(mask):
        raise ValueError(f"outline mask {np.shape(mask)} does not match the image "
                         f"{rgb.shape[:2]}")
    out = np.array(rgb, dtype=np.uint8, copy=True)
    out[outline(mask, width)] = color
    return out


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 ``H x W``, ``H x W x 3`` or ``H x W x 4`` -> PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def heatmap_png(values: np.ndarray, cmap: str = COLORMAP) -> bytes:
    """The RGBA heatmap of scaled ``values`` as PNG bytes (size of the map)."""
    return png_bytes(heatmap_rgba(values, cmap))


def overlay_rgb(
    image: np.ndarray, values: np.ndarray, cmap: str = COLORMAP,
    regions: np.ndarray | None = None,
) -> np.ndarray:
    """``image`` (uint8 ``H x W x C``, same size as ``values``) blended with its heatmap, with
    the outlines of the ``regions`` mask (``H x W`` bool) drawn on top; uint8 ``H x W x 3``."""
    rgba = heatmap_rgba(values, cmap).astype(np.float32)
    base = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    alpha = rgba[..., 3:] / 255.0
    out = np.clip(np.rint(base.astype(np.float32) * (1.0 - alpha) + rgba[..., :3] * alpha),
                  0, 255).astype(np.uint8)
    return out if regions is None else draw_outlines(out, regions)


def overlay_png(
    image: np.ndarray, values: np.ndarray, cmap: str = COLORMAP,
    regions: np.ndarray | None = None,
) -> bytes:
    """:func:`overlay_rgb` as PNG bytes."""
    return png_bytes(overlay_rgb(image, values, cmap, regions))
