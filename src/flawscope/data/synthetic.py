"""Embedded synthetic dataset in the MVTec-AD layout, with exact pixel masks.

``flawscope demo`` and the tests need data without downloads, so two categories are drawn
procedurally and deterministically:

``tile``
    a gray (``L`` PNG) stone-like surface: mottling, grain, dark and light flecks, faint
    periodic relief, brightness/contrast jitter.
``washer``
    a shaded, machined metal ring (``RGB`` PNG) on a plain dark background with a soft shadow,
    with small position / light-direction / brightness jitter.

Every image is drawn from its own ``np.random.default_rng`` keyed by (seed, category, split,
defect type, index), so the files do not depend on the order or number of other images.
A defect is drawn as a soft footprint ``alpha`` blended towards a defect look; the mask is
``alpha >= 0.5``, i.e. exactly where the pixels changed meaningfully.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy.ndimage import fourier_gaussian, gaussian_filter

from flawscope.errors import ConfigError, DatasetError

CATEGORIES = ("tile", "washer")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "tile": ("scratch", "hole", "stain", "crack"),
    "washer": ("scratch", "hole", "missing", "stain"),
}
GENERATOR = "flawscope.data.synthetic"
GENERATOR_VERSION = 1
MANIFEST = "flawscope-synthetic.json"
MIN_DEFECT_FRACTION = 0.002  # smallest mask area (fraction of the image) of a defect
MIN_IMAGE_SIZE = 32

Array = np.ndarray


class SyntheticSample(NamedTuple):
    """One rendered image; ``clean`` is the same part without the defect."""

    image: Array  # uint8, H x W (tile) or H x W x 3 (washer)
    mask: Array  # bool, H x W; all False for good parts
    clean: Array  # uint8, like ``image``


class _Scene(NamedTuple):
    image: Array  # float32 H x W x C in [0, 1], without sensor noise
    support: Array  # float32 H x W: where the part is (1 = all of it)
    background: Array  # float32 H x W x C: what shows where the part is missing
    center: tuple[float, float]  # (y, x) of the part
    radii: tuple[float, float]  # (inner, outer) ring radius; (0, size) for a surface


# ----------------------------------------------------------------------------- helpers
def _rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(f"{split}/{defect}".encode()), index]
    return np.random.default_rng(key)


def _grid(size: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smoothstep(e0: float, e1: float, x: Array) -> Array:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _field(rng: np.random.Generator, size: int, sigma: float) -> Array:
    """Band-limited noise of zero mean and unit standard deviation."""
    spectrum = np.fft.rfft2(rng.standard_normal((size, size), np.float32))
    f = np.fft.irfft2(fourier_gaussian(spectrum, sigma, n=size), s=(size, size))
    return ((f - f.mean()) / (f.std() + 1e-8)).astype(np.float32)


def _segments_alpha(a: Array, b: Array, width: Array, size: int) -> Array:
    """Anti-aliased coverage of thick segments ``a[i] -> b[i]`` (points as (y, x))."""
    alpha = np.zeros((size, size), np.float32)
    pad = float(width.max()) / 2 + 2
    lo = np.clip(np.floor(np.minimum(a, b).min(0) - pad), 0, size).astype(int)
    hi = np.clip(np.ceil(np.maximum(a, b).max(0) + pad), 0, size).astype(int)
    if (hi <= lo).any():
        return alpha
    yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]].astype(np.float32)
    p = np.stack([yy, xx], -1)[None]  # 1 x h x w x 2
    a, b, width = (v.astype(np.float32) for v in (a, b, width))
    a_, ab = a[:, None, None, :], (b - a)[:, None, None, :]
    t = np.clip(((p - a_) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6), 0, 1)
    d = np.linalg.norm(p - (a_ + t[..., None] * ab), axis=-1)
    cover = np.clip(width[:, None, None] / 2 + 0.5 - d, 0, 1).max(0)
    alpha[lo[0] : hi[0], lo[1] : hi[1]] = cover
    return alpha


def _luma(img: Array) -> Array:
    return img.mean(-1, keepdims=True)


# ----------------------------------------------------------------------------- parts
def _tile(rng: np.random.Generator, size: int) -> _Scene:
    """Gray stone-like surface with flecks and faint periodic relief."""
    k = size / 128
    yy, xx = _grid(size)
    level, contrast = rng.uniform(0.47, 0.58), rng.uniform(0.85, 1.15)
    angle, period = rng.uniform(-0.3, 0.3), rng.uniform(10, 14) * k
    phase = rng.uniform(0, 2 * np.pi)
    relief = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    dark = _smoothstep(2.0, 2.6, _field(rng, size, 1.3 * k))
    light = _smoothstep(2.1, 2.7, _field(rng, size, 1.7 * k))
    texture = (
        0.045 * _field(rng, size, 12 * k)  # mottling
        + 0.04 * _field(rng, size, 0.8 * k)  # grain
        + 0.012 * relief
        - 0.2 * dark
        + 0.14 * light
    )
    img = np.clip(level + contrast * texture, 0, 1)[..., None].astype(np.float32)
    ones = np.ones((size, size), np.float32)
    return _Scene(img, ones, img, (size / 2, size / 2), (0.0, float(size)))


def _washer(rng: np.random.Generator, size: int) -> _Scene:
    """Machined steel ring with bevelled edges, lit from the upper left, on a dark belt."""
    k = size / 128
    yy, xx = _grid(size)
    cy, cx = (size / 2 + float(v) for v in np.clip(rng.normal(0, 0.012, 2), -0.03, 0.03) * size)
    r_out = size * float(rng.uniform(0.355, 0.375))
    r_in = r_out * float(rng.uniform(0.44, 0.48))
    dy, dx = yy - cy, xx - cx
    r, th = np.hypot(dy, dx), np.arctan2(dy, dx)
    part = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)

    t = np.clip((r - r_in) / (r_out - r_in), 0, 1)  # 0 at the hole, 1 at the rim
    bevel = 0.2
    slope = 1.5 * (np.clip(1 - t / bevel, 0, 1) - np.clip(1 - (1 - t) / bevel, 0, 1))
    n = np.stack([-slope * dx / (r + 1e-6), -slope * dy / (r + 1e-6), np.ones_like(slope)], -1)
    n /= np.sqrt(1 + slope * slope)[..., None]  # surface normal of the bevelled profile
    phi, elev = -0.75 * np.pi + rng.normal(0, 0.12), np.deg2rad(rng.uniform(45, 60))
    light = np.array([np.cos(phi) * np.cos(elev), np.sin(phi) * np.cos(elev), np.sin(elev)])
    half = (light + [0, 0, 1]) / np.linalg.norm(light + [0, 0, 1])
    light, half = light.astype(np.float32), half.astype(np.float32)
    diffuse, spec = np.clip(n @ light, 0, 1), np.clip(n @ half, 0, 1) ** 40

    lathe = np.interp(r, np.arange(int(r_out) + 3), gaussian_filter(
        rng.standard_normal(int(r_out) + 3), 0.6 * k)).astype(np.float32)  # turning marks
    polish = sum(rng.normal(0, 0.025) * np.cos(j * th + rng.uniform(0, 6.3)) for j in (1, 2, 3))
    shade = (0.2 + 0.6 * diffuse + 0.45 * spec + 0.05 * lathe + polish
             + 0.015 * _field(rng, size, 0.7 * k)) * rng.uniform(0.9, 1.05)
    tint = (np.array([0.8, 0.82, 0.86]) + rng.normal(0, 0.006, 3)).astype(np.float32)
    metal = shade[..., None] * tint

    belt = (np.array([0.19, 0.21, 0.24]) * rng.uniform(0.9, 1.1)).astype(np.float32)
    bg = belt + (0.03 * (yy / size - 0.5) + 0.012 * _field(rng, size, 1.5 * k))[..., None]
    shadow = gaussian_filter(np.roll(part, (round(3 * k), round(2 * k)), (0, 1)), 2.5 * k)
    shaded_bg = bg * (1 - 0.4 * shadow)[..., None]  # a missing piece shows unshaded belt
    img = metal * part[..., None] + shaded_bg * (1 - part[..., None])
    return _Scene(np.clip(img, 0, 1), part, np.clip(bg, 0, 1), (cy, cx), (r_in, r_out))


_PARTS = {"tile": _tile, "washer": _washer}


# ----------------------------------------------------------------------------- defects
def _place(rng: np.random.Generator, s: _Scene, margin: float) -> Array:
    """A random point on the part, ``margin`` pixels away from its edges."""
    size = s.image.shape[0]
    r_in, r_out = s.radii
    if r_in == 0:  # a surface: anywhere away from the image border
        return rng.uniform(0.12 * size, 0.88 * size, 2)
    r = rng.uniform(r_in + margin, max(r_out - margin, r_in + margin + 1))
    th = rng.uniform(-np.pi, np.pi)
    return np.array(s.center) + r * np.array([np.sin(th), np.cos(th)])


def _scratch(rng: np.random.Generator, s: _Scene) -> tuple[Array, Array]:
    size, k = s.image.shape[0], s.image.shape[0] / 128
    c = _place(rng, s, 2 * k)
    if s.radii[0] == 0:
        length, ang = rng.uniform(0.22, 0.42) * size, rng.uniform(0, np.pi)
    else:  # roughly along the ring, so most of it lies on the metal
        length = rng.uniform(0.18, 0.3) * size
        ang = np.arctan2(c[0] - s.center[0], c[1] - s.center[1]) + np.pi / 2 + rng.normal(0, 0.4)
    d = 0.5 * length * np.array([np.sin(ang), np.cos(ang)])
    width = np.array([rng.uniform(1.5, 3.0) * k])
    alpha = _segments_alpha((c - d)[None], (c + d)[None], width, size)
    if rng.random() < 0.5:
        return alpha, np.clip(s.image + rng.uniform(0.3, 0.4), 0, 1)
    return alpha, s.image * rng.uniform(0.3, 0.45)


def _hole(rng: np.random.Generator, s: _Scene) -> tuple[Array, Array]:
    size, k = s.image.shape[0], s.image.shape[0] / 128
    radius = rng.uniform(4.0, 7.0) * k
    c = _place(rng, s, radius + 1)
    yy, xx = _grid(size)
    d = np.hypot(yy - c[0], xx - c[1])
    alpha = np.clip(radius + 0.5 - d, 0, 1)
    inside = 0.04 + 0.12 * np.clip(d / radius, 0, 1) ** 2  # darkest in the middle
    return alpha, np.broadcast_to(inside[..., None], s.image.shape).astype(np.float32)


def _stain(rng: np.random.Generator, s: _Scene) -> tuple[Array, Array]:
    size, k = s.image.shape[0], s.image.shape[0] / 128
    a, b = rng.uniform(5, 11, 2) * k
    c = _place(rng, s, 0.6 * min(a, b))
    yy, xx = _grid(size)
    ang = rng.uniform(0, np.pi)
    u = (yy - c[0]) * np.cos(ang) + (xx - c[1]) * np.sin(ang)
    v = -(yy - c[0]) * np.sin(ang) + (xx - c[1]) * np.cos(ang)
    q = np.hypot(u / a, v / b) * (1 + 0.2 * _field(rng, size, 3 * k))  # ragged outline
    alpha, strength = _smoothstep(1.2, 0.8, q), rng.uniform(0.8, 0.95)
    if s.image.shape[-1] == 3:  # rust / oil on metal, keeping some of the shading
        color = np.array([0.55, 0.3, 0.13]) * rng.uniform(0.8, 1.1)
        look = color * (0.5 + 0.6 * _luma(s.image))
    elif rng.random() < 0.6:
        look = s.image * rng.uniform(0.4, 0.55)
    else:
        look = s.image + rng.uniform(0.28, 0.38)
    return alpha, np.clip(s.image + strength * (look - s.image), 0, 1).astype(np.float32)


def _crack(rng: np.random.Generator, s: _Scene) -> tuple[Array, Array]:
    size, k = s.image.shape[0], s.image.shape[0] / 128
    step = 1.5 * k
    heads, tails, widths = [], [], []
    start, base = _place(rng, s, 0), rng.uniform(-np.pi, np.pi)
    for branch in range(1 + (rng.random() < 0.5)):
        n = int(rng.uniform(0.25, 0.45) * size / step) // (1 + branch)
        ang = base + (rng.choice([-1, 1]) * rng.uniform(0.5, 1.2) if branch else 0)
        ang = ang + np.cumsum(rng.normal(0, 0.08, n)) + rng.normal(0, 0.6, n)  # drift + zigzag
        pts = start + np.cumsum(step * np.stack([np.sin(ang), np.cos(ang)], -1), 0)
        pts = np.vstack([start, pts])
        heads.append(pts[:-1])
        tails.append(pts[1:])
        taper = 0.45 + 0.55 * np.sin(np.pi * (np.arange(n) + 0.5) / n)
        widths.append(rng.uniform(1.3, 2.2) * k * taper / (1 + 0.4 * branch))
        start = pts[rng.integers(n // 4, 3 * n // 4 + 1)]
    alpha = _segments_alpha(np.vstack(heads), np.vstack(tails), np.concatenate(widths), size)
    return alpha, s.image * rng.uniform(0.12, 0.25)


def _missing(rng: np.random.Generator, s: _Scene) -> tuple[Array, Array]:
    """A broken-off piece of the ring: a ragged wedge from the rim inwards."""
    size = s.image.shape[0]
    (cy, cx), (r_in, r_out) = s.center, s.radii
    yy, xx = _grid(size)
    r = np.hypot(yy - cy, xx - cx)
    th0, half = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 0.38)
    rel = np.angle(np.exp(1j * (np.arctan2(yy - cy, xx - cx) - th0)))
    jag = np.interp(r, np.linspace(0, r_out + 2, 12), rng.normal(0, 0.18, 12))
    side = np.clip((half * (1 + jag) - np.abs(rel)) * r + 0.5, 0, 1)
    depth = (r_out - r_in) * rng.uniform(0.55, 1.1)
    cut = r_out - depth * (1 + np.interp(rel, np.linspace(-1, 1, 9), rng.normal(0, 0.12, 9)))
    alpha = side * np.clip(r - cut + 0.5, 0, 1)
    return alpha, s.background


_DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "crack": _crack,
            "missing": _missing}


# ----------------------------------------------------------------------------- rendering
def _to_uint8(img: Array) -> Array:
    out = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def render_sample(
    category: str,
    defect: str = "good",
    *,
    index: int = 0,
    split: str = "test",
    image_size: int = 128,
    seed: int = 0,
) -> SyntheticSample:
    """Draw one image (and its mask) in memory; the same arguments give the same pixels."""
    if category not in _PARTS:
        raise ConfigError(f"synthetic category {category!r}: unknown; choose from "
                          f"{', '.join(CATEGORIES)}")
    if defect != "good" and defect not in DEFECT_TYPES[category]:
        raise ConfigError(f"defect type {defect!r}: unknown for {category}; choose from good, "
                          f"{', '.join(DEFECT_TYPES[category])}")
    rng = _rng(seed, category, split, defect, index)
    scene = _PARTS[category](rng, image_size)
    noise = rng.normal(0, 0.01, scene.image.shape).astype(np.float32)  # sensor noise
    clean = _to_uint8(scene.image + noise)
    if defect == "good":
        return SyntheticSample(clean, np.zeros((image_size,) * 2, bool), clean)
    for _ in range(20):  # redraw the rare defect that fell mostly off the part
        alpha, look = _DEFECTS[defect](rng, scene)
        alpha = (alpha * scene.support)[..., None]
        mask = alpha[..., 0] >= 0.5
        if mask.mean() >= MIN_DEFECT_FRACTION:
            break
    image = _to_uint8(scene.image * (1 - alpha) + look * alpha + noise)
    return SyntheticSample(image, mask, clean)


# ----------------------------------------------------------------------------- dataset
def _plan(p: dict) -> Iterator[tuple[str, str, str, str, int]]:
    """``(relative path, category, split, defect, index)`` of every image of the dataset."""
    for cat in p["categories"]:
        groups = [("train", "good", p["n_train"]), ("test", "good", p["n_test_good"])]
        groups += [("test", d, p["n_test_per_defect"]) for d in DEFECT_TYPES[cat]]
        for split, defect, n in groups:
            for i in range(n):
                yield f"{cat}/{split}/{defect}/{i:03d}.png", cat, split, defect, i


def _mask_path(rel: str) -> str:
    cat, _, defect, name = rel.split("/")
    return f"{cat}/ground_truth/{defect}/{name[:-4]}_mask.png"


def _save_png(array: Array, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR else None


def _is_complete(folder: Path, params: dict) -> bool:
    if _read_manifest(folder) != params:
        return False
    return all(
        (folder / rel).is_file() and (defect == "good" or (folder / _mask_path(rel)).is_file())
        for rel, _, _, defect, _ in _plan(params)
    )


def _write(folder: Path, params: dict) -> None:
    def one(item: tuple[str, str, str, str, int]) -> None:
        rel, cat, split, defect, i = item
        s = render_sample(cat, defect, index=i, split=split, image_size=params["image_size"],
                          seed=params["seed"])
        _save_png(s.image, folder / rel)
        if defect != "good":
            _save_png(s.mask.astype(np.uint8) * 255, folder / _mask_path(rel))

    # every image has its own generator, so threads do not change the result
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(one, _plan(params)):
            pass
    finally:
        pool.shutdown(cancel_futures=True)
    # written last: a folder with a manifest is complete
    (folder / MANIFEST).write_text(json.dumps(params, indent=1) + "\n")


def generate_dataset(
    out_dir: str | os.PathLike,
    categories: Sequence[str] = CATEGORIES,
    *,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_per_defect: int = 8,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset in the MVTec layout under ``out_dir`` and return its path.

    A complete dataset of the same parameters already there is reused. ``overwrite`` replaces
    a synthetic dataset of other parameters; a folder holding anything else is never touched.
    The dataset is built in a hidden sibling folder and moved into place when complete.
    """
    out = Path(out_dir)
    cats = [categories] if isinstance(categories, str) else list(categories)
    bad = [c for c in cats if c not in CATEGORIES]
    if not cats or bad or len(set(cats)) != len(cats):
        raise ConfigError(f"synthetic categories {cats}: choose distinct ones of "
                          f"{', '.join(CATEGORIES)}")
    if min(n_train, n_test_good, n_test_per_defect, seed) < 0:
        raise ConfigError("synthetic dataset: image counts and seed must be >= 0")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"synthetic image size {image_size}: must be at least {MIN_IMAGE_SIZE}")
    params = {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "categories": cats,
        "n_train": int(n_train), "n_test_good": int(n_test_good),
        "n_test_per_defect": int(n_test_per_defect), "image_size": int(image_size),
        "seed": int(seed),
    }

    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise DatasetError(f"{out}: exists and is not a folder; choose another output folder")
        old = _read_manifest(out)
        if old is None and any(out.iterdir()):
            raise DatasetError(f"{out}: folder is not empty and is not a flawscope synthetic "
                               "dataset; choose another or an empty folder")
        if old is not None and old != params:
            if not overwrite:
                raise DatasetError(f"{out}: holds a synthetic dataset of other parameters; "
                                   "pass overwrite=True (--overwrite) to replace it")
        elif old is not None and not overwrite and _is_complete(out, params):
            return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    trash = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
    try:
        _write(tmp, params)
        if out.is_dir():
            os.replace(out, trash)  # only our own dataset or an empty folder gets here
        try:
            os.replace(tmp, out)
        except OSError:  # another process put a dataset there meanwhile
            if not _is_complete(out, params):
                if not out.exists() and trash.exists():
                    os.replace(trash, out)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
    return out
