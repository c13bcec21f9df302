"""Anomaly heatmaps, overlays and captioned sample panels as PNG: the one look of every
picture flawscope draws of a map (the service's ``heatmap_png`` / ``overlay_png``,
``predict --save-overlays`` and the HTML report's example cards). A colormap lookup table
applied with numpy (no pyplot).

Scale: with ``scale="score"`` (the image score is the maximum of the map) the colour is
``0.5 * value / threshold``: 0 for no anomaly, the middle of the colormap exactly at the
decision threshold, the top at twice the threshold, the same for every image, so heatmaps
compare (maps with negative values or a non-positive threshold go through the model's
:class:`~flawscope.threshold.ScoreNormalization` instead, which also puts the threshold at 0.5).
With ``scale="image"`` each map is stretched to its own range (relative heatmap), or to a
``value_range`` shared by several maps (the report shares one per model, so its cards
compare).

The heatmap is RGBA: colour from the colormap, opacity growing with the anomaly, so it can be
laid over the image; values below :data:`TRANSPARENT_BELOW` (a fifth of the threshold on the
score scale) are fully transparent, so the part itself stays visible where nothing is wrong.
:func:`overlay_png` blends it into the image itself and can draw defect-region outlines
(:func:`draw_outlines`: the region mask minus its erosion) and ground-truth outlines
(white on a black edge); :func:`sample_panel_rgb` puts the image and its overlay side by side
above the caption of :func:`captioned_overlay_rgb`.
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
#: ground-truth mask outlines: white on a black edge (visible on bright and dark parts)
TRUTH_COLOR, TRUTH_EDGE = (255, 255, 255), (0, 0, 0)


@lru_cache(maxsize=4)
def colormap_lut(name: str = COLORMAP) -> np.ndarray:
    """``256 x 3`` uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def scale_map(
    amap: np.ndarray, scale: str = "score", normalization: ScoreNormalization | None = None,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Anomaly map -> values in [0, 1] (see the module docstring for ``scale`` and
    ``value_range``)."""
    amap = np.nan_to_num(np.asarray(amap, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if scale == "score" and normalization is not None:
        t = normalization.threshold
        if t > 0 and float(amap.min(initial=0.0)) >= 0:
            return np.clip(0.5 * amap / t, 0.0, 1.0)
        return normalization(amap)
    if amap.size == 0:
        return amap
    lo, hi = value_range if value_range is not None else (float(amap.min()), float(amap.max()))
    return np.clip((amap - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(amap)


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


def line_width(shape: tuple[int, ...]) -> int:
    """Outline width in pixels: the shorter side / 160, rounded, at least 1 (1 below 240 px,
    2 at 320 px: a 1-pixel line vanishes in a 320 px image shown at page size)."""
    return max(1, round(min(shape[:2]) / 160))


def draw_truth(rgb: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """``rgb`` with the outline of a ground-truth mask: white on a black edge."""
    if truth is None or not np.any(truth) or np.all(truth):
        return rgb
    w = line_width(rgb.shape)
    return draw_outlines(draw_outlines(rgb, truth, TRUTH_EDGE, width=2 * w), truth,
                         TRUTH_COLOR, width=w)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 ``H x W x 1`` or ``H x W x 3`` -> ``H x W x 3``."""
    return image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)


def overlay_rgb(
    image: np.ndarray, values: np.ndarray, cmap: str = COLORMAP,
    regions: np.ndarray | None = None, truth: np.ndarray | None = None,
) -> np.ndarray:
    """``image`` (uint8 ``H x W x C``, same size as ``values``) blended with its heatmap, with
    the outlines of the ``regions`` mask (``H x W`` bool, magenta) and of a ground-truth
    ``truth`` mask (white) drawn on top; uint8 ``H x W x 3``."""
    rgba = heatmap_rgba(values, cmap).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    out = np.clip(np.rint(as_rgb(image).astype(np.float32) * (1.0 - alpha)
                          + rgba[..., :3] * alpha), 0, 255).astype(np.uint8)
    out = draw_truth(out, truth)
    return out if regions is None else draw_outlines(out, regions, width=line_width(out.shape))


def overlay_png(
    image: np.ndarray, values: np.ndarray, cmap: str = COLORMAP,
    regions: np.ndarray | None = None,
) -> bytes:
    """:func:`overlay_rgb` as PNG bytes."""
    return png_bytes(overlay_rgb(image, values, cmap, regions))


#: smallest width of a captioned overlay (small model inputs are enlarged to it)
CAPTION_MIN_WIDTH = 360
VERDICT_COLOURS = {"defect": (200, 30, 30), "ok": (20, 130, 60)}


def captioned_overlay_rgb(
    overlay: np.ndarray, *, verdict: str, score: float, threshold: float, name: str,
    scale: str = "score", cmap: str = COLORMAP,
    value_range: tuple[float, float] | None = None, truth_shown: bool = False,
) -> np.ndarray:
    """``overlay`` (uint8 ``H x W x 3``, from :func:`overlay_rgb`) with a caption band below:
    the verdict, the score against the threshold and the file name, and a colour bar that
    says what the heatmap colours mean (on the ``score`` scale: 0, the threshold in the
    middle, twice the threshold at the top; on the ``image`` scale: this image's low to
    high, or ``value_range`` when the maps share one). ``truth_shown``: the legend names the
    ground-truth outline. Small overlays are enlarged to :data:`CAPTION_MIN_WIDTH` pixels."""
    from PIL import ImageDraw, ImageFont

    img = Image.fromarray(overlay)
    if img.width < CAPTION_MIN_WIDTH:
        factor = CAPTION_MIN_WIDTH / img.width
        img = img.resize((CAPTION_MIN_WIDTH, max(1, round(img.height * factor))),
                         Image.Resampling.NEAREST)
    w = img.width
    size = 13 if w < 500 else 16
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    line = size + 5
    bar_h = max(8, int(size / 1.5))
    band_h = (4 if truth_shown else 3) * line + int(bar_h) + size + 14
    canvas = Image.new("RGB", (w, img.height + band_h), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = img.height + 4
    flagged = verdict == "defect"
    head = f"{verdict.upper()}  score {score:.4g} {'>' if flagged else '<='} threshold " \
           f"{threshold:.4g}"
    draw.text((6, y), head, fill=VERDICT_COLOURS.get(verdict, (0, 0, 0)), font=font)
    draw.text((6, y + line), _fit_text(draw, name, font, w - 12), fill=(40, 40, 40),
              font=font)
    # the colour bar: the colormap left to right, ticks below
    y_bar = y + 2 * line + 2
    x0, x1 = 6, w - 6
    ramp = colormap_lut(cmap)[np.linspace(0, 255, x1 - x0).astype(np.uint8)]
    strip = np.repeat(ramp[None], int(bar_h), axis=0)
    canvas.paste(Image.fromarray(strip), (x0, y_bar))
    draw.rectangle((x0, y_bar, x1 - 1, y_bar + int(bar_h)), outline=(90, 90, 90))
    if scale == "score":
        ticks = [(0.0, "0"), (0.5, f"threshold {threshold:.3g}"), (1.0, f"{2 * threshold:.3g}+")]
        title = "colour = anomaly"
    elif value_range is not None:
        ticks = [(0.0, f"{value_range[0]:.3g}"), (1.0, f"{value_range[1]:.3g}")]
        title = "colour = anomaly map value"
    else:
        ticks = [(0.0, "low"), (1.0, "high")]
        title = "colour = anomaly, per image"
    y_tick = y_bar + int(bar_h) + 2
    for pos, text in ticks:
        x = x0 + pos * (x1 - x0 - 1)
        draw.line((x, y_bar + int(bar_h), x, y_tick + 1), fill=(60, 60, 60))
        tw = draw.textlength(text, font=font)
        tx = min(max(x - tw / 2, x0), x1 - tw)
        draw.text((tx, y_tick), text, fill=(60, 60, 60), font=font)
    legend = [f"{title}; magenta = defect region"]
    if truth_shown:
        legend.append("white outline = true defect (ground truth)")
    for k, text in enumerate(legend, 1):
        draw.text((6, y_tick + k * line), _fit_text(draw, text, font, w - 12),
                  fill=(90, 90, 90), font=font)
    return np.asarray(canvas)


def _fit_text(draw, text: str, font, width: float) -> str:
    """``text``, shortened in the middle with "…" to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    keep = len(text)
    while keep > 4:
        keep -= 1
        short = text[: keep // 2] + "…" + text[len(text) - keep // 2:]
        if draw.textlength(short, font=font) <= width:
            return short
    return text[:4]


def sample_panel_rgb(
    image: np.ndarray | None, values: np.ndarray, *, verdict: str, score: float,
    threshold: float, name: str, scale: str = "score", regions: np.ndarray | None = None,
    truth: np.ndarray | None = None, value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """The image (left) and its overlay (right, :func:`overlay_rgb`), both with the
    ground-truth outline, above the caption of :func:`captioned_overlay_rgb`; ``image``
    None (unreadable) shows a gray field. uint8 ``H x (2W + 4) x 3``."""
    h, w = values.shape
    base = np.full((h, w, 3), 128, np.uint8) if image is None else as_rgb(image)
    gap = np.full((h, 4, 3), 255, np.uint8)
    side = np.concatenate([draw_truth(base, truth), gap,
                           overlay_rgb(base, values, regions=regions, truth=truth)], axis=1)
    return captioned_overlay_rgb(side, verdict=verdict, score=score, threshold=threshold,
                                 name=name, scale=scale, value_range=value_range,
                                 truth_shown=truth is not None and bool(np.any(truth)))
