"""Image decoding with clear errors, one policy for library, CLI and service.

Every image enters flawscope through :func:`decode_image` (files: :func:`read_image`; the
service's uploads: the same function on bytes): any size, gray or colour, 8- or 16-bit,
palette or alpha, returned as ``uint8`` ``H x W x C`` with C = 1 or 3. The policy:

* the pixel count (width x height) is read from the header and checked against
  :func:`max_image_pixels` (default 50 megapixels; environment ``FLAWSCOPE_MAX_IMAGE_PIXELS``
  or :func:`set_max_image_pixels`) *before* the pixels are decoded, so a decompression bomb
  (a small file of huge dimensions) is refused without allocating its size; Pillow's own
  ``DecompressionBombWarning`` is treated as an error as well;
* the EXIF orientation tag is applied (:func:`PIL.ImageOps.exif_transpose`), so a photo
  taken on its side is scored upright, as image viewers show it; :func:`image_dimensions`
  reports the upright size.

Bad files raise :class:`~flawscope.errors.ImageReadError` naming the path and the problem; its
``reason`` (``missing``, ``empty``, ``not-image``, ``too-large``, ``corrupt``) lets the
service choose the HTTP status.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flawscope.errors import ConfigError, ImageReadError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm"}
)
#: default largest image (width x height) flawscope decodes
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
#: environment variable that overrides the default
MAX_PIXELS_ENV = "FLAWSCOPE_MAX_IMAGE_PIXELS"
_max_pixels_override: int | None = None
# Pillow's own guard stays on as a backstop above ours (its limit raised to 16k x 16k, since
# line-scan cameras produce legitimately large images), and its warning is an error: an
# image that reaches Pillow's warning limit is refused, not decoded.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 16384 * 16384)
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
#: EXIF tag 0x0112 values that swap width and height (rotations by 90 or 270 degrees)
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


def set_max_image_pixels(limit: int | None) -> None:
    """Set the largest image (width x height) for this process; None: back to the
    environment / default."""
    global _max_pixels_override
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise ConfigError(f"max image pixels {limit}: must be at least 1")
    _max_pixels_override = None if limit is None else int(limit)


def max_image_pixels() -> int:
    """The pixel limit in force: :func:`set_max_image_pixels`, else the environment variable
    ``FLAWSCOPE_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    if _max_pixels_override is not None:
        return _max_pixels_override
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise ConfigError(f"{MAX_PIXELS_ENV}={raw!r}: expected a whole number of pixels") \
            from None
    if value < 1:
        raise ConfigError(f"{MAX_PIXELS_ENV}={raw!r}: must be at least 1")
    return value

Size = tuple[int, int]  # (height, width)


def as_size(size: int | Sequence[int]) -> Size:
    """``256 -> (256, 256)``; ``(h, w)`` stays as is."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ConfigError(f"image size {size}: must be at least 1 pixel per side")
    return h, w


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _refuse(name: str, reason: str, message: str) -> ImageReadError:
    exc = ImageReadError(f"{name}: {message}")
    exc.reason = reason
    return exc


def _check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    if width * height > limit:
        raise _refuse(
            name, "too-large",
            f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels; at most "
            f"{limit / 1e6:.1f} megapixels are decoded (set {MAX_PIXELS_ENV} to change it)")


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a damaged EXIF block is ignored, as viewers do
        return 1


def open_image(
    source: str | os.PathLike | bytes,
    name: str | None = None,
    *,
    max_pixels: int | None = None,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Open an image file (or its bytes), check its size from the header, decode it and
    turn it upright (EXIF orientation).

    ``name`` is used in error messages (default: the path); ``max_pixels`` overrides
    :func:`max_image_pixels`; ``formats`` restricts Pillow's decoders (e.g. ``("PNG",)``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "image"
        if len(source) == 0:
            raise _refuse(label, "empty", "empty file (0 bytes)")
        fp: io.BytesIO | Path = io.BytesIO(bytes(source))
    else:
        fp = Path(source)
        label = name or str(fp)
        if not fp.exists():
            raise _refuse(label, "missing", "no such file")
        if fp.is_dir():
            raise _refuse(label, "missing", "is a folder, expected an image file")
        if fp.stat().st_size == 0:
            raise _refuse(label, "empty", "empty file (0 bytes)")
    try:
        img = Image.open(fp, formats=list(formats) if formats else None)
    except UnidentifiedImageError:
        accepted = f"; accepted: {', '.join(formats)}" if formats else ""
        raise _refuse(label, "not-image",
                      f"not an image file (format not recognised{accepted})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        limit = max_image_pixels() if max_pixels is None else int(max_pixels)
        raise _refuse(label, "too-large",
                      f"image too large ({str(exc).rstrip('.')}); at most {limit / 1e6:.1f} "
                      f"megapixels are decoded") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _refuse(label, "corrupt", f"unreadable image header ({exc})") from None
    try:
        w, h = img.size
        _check_pixels(label, w, h, max_pixels)
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise _refuse(label, "too-large", f"image is {w}x{h}, above Pillow's "
                          f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels")
        try:
            img.load()
            if _orientation(img) != 1:
                img = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _refuse(label, "too-large", f"image too large ({exc})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _refuse(label, "corrupt", f"truncated or corrupt image data ({exc})") \
                from None
    except BaseException:
        img.close()
        raise
    return img


def decode_image(
    source: str | os.PathLike | bytes,
    name: str | None = None,
    *,
    channels: int | None = None,
    size: int | Sequence[int] | None = None,
    max_pixels: int | None = None,
    formats: Sequence[str] | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file or its bytes under the policy of this module.

    Returns ``(uint8 H x W x C, (upright width, upright height))``: the array converted to
    ``channels`` and resized to ``size`` when given. Arguments as :func:`open_image`.
    """
    img = open_image(source, name, max_pixels=max_pixels, formats=formats)
    label = name or str(source if not isinstance(source, (bytes, bytearray)) else "image")
    with img:
        w, h = img.size
        try:
            arr = pil_to_uint8(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise _refuse(label, "corrupt", f"truncated or corrupt image data ({exc})") \
                from None
    if arr.size == 0:
        raise _refuse(label, "empty", "image has no pixels")
    return resize(convert_channels(arr, channels), size), (int(w), int(h))


def image_dimensions(path: str | os.PathLike) -> tuple[int, int]:
    """Upright ``(height, width)`` of an image file from its header (EXIF orientation
    applied), without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise _refuse(str(path), "missing", "no such file")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if _orientation(img) in _TRANSPOSED_ORIENTATIONS:
                w, h = h, w
    except UnidentifiedImageError:
        raise _refuse(str(path), "not-image", "not an image file (format not recognised)") \
            from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _refuse(str(path), "too-large", f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _refuse(str(path), "corrupt", f"unreadable image header ({exc})") from None
    if h < 1 or w < 1:
        raise _refuse(str(path), "empty", "image has no pixels")
    return int(h), int(w)


def expand_images(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their image files (recursively, sorted)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise ImageReadError(f"{p}: folder contains no image files")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise ImageReadError(f"{p}: no such file or folder")
    return out


def pil_to_uint8(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 array H x W (gray) or H x W x 3 (colour)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode == "LA":
        return np.asarray(img.getchannel("L"), dtype=np.uint8)
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            scale = 255.0 if lo >= 0.0 and hi <= 1.0 else 1.0
            arr = arr * scale
        elif mode.startswith("I;16") or arr.max() > 255:
            # 16-bit data (Pillow loads 16-bit PNG as "I;16" or "I"): full range -> 0..255.
            arr = arr / 257.0
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def convert_channels(arr: np.ndarray, channels: int | None) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    have = arr.shape[2]
    if channels is None or channels == have:
        return arr
    if channels == 3 and have == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 1 and have == 3:
        # ITU-R 601-2 luma, as Pillow's convert("L")
        luma = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]
    raise ConfigError(f"channels={channels}: expected 1 (gray) or 3 (RGB)")


def resize(arr: np.ndarray, size: int | Sequence[int] | None) -> np.ndarray:
    """Resize ``H x W x C`` uint8 to ``size`` with Pillow's bilinear filter.

    Pillow widens the filter when shrinking (antialiasing), like torchvision's
    ``antialias=True`` that pretrained backbones are usually fed with; a plain box filter
    measurably lowered feature-detector AUROC.
    """
    if size is None:
        return arr
    h, w = as_size(size)
    if arr.shape[:2] == (h, w):
        return arr
    method = Image.Resampling.BILINEAR
    planes = [
        np.asarray(Image.fromarray(arr[:, :, c]).resize((w, h), method), dtype=np.uint8)
        for c in range(arr.shape[2])
    ]
    return np.stack(planes, axis=2)


def read_image(
    path: str | os.PathLike,
    channels: int | None = None,
    size: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Decode one image as ``uint8`` ``H x W x C``.

    ``channels``: 1 (gray), 3 (RGB) or None (keep: gray stays 1, anything else 3).
    ``size``: optional output size, int or ``(height, width)``.
    """
    return decode_image(Path(path), channels=channels, size=size)[0]


def read_mask(path: str | os.PathLike | None, size: Sequence[int]) -> np.ndarray:
    """Binary defect mask at ``size`` (``(h, w)``); ``None`` gives an empty mask."""
    h, w = as_size(size)
    if path is None:
        return np.zeros((h, w), dtype=bool)
    path = Path(path)
    arr = decode_image(path, channels=1)[0][:, :, 0]
    if arr.shape != (h, w):
        arr = np.asarray(
            Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8
        )
    return arr >= 128


@dataclass
class LoadedImages:
    """A batch of decoded images: ``pixels`` is ``N x C x H x W`` uint8."""

    pixels: np.ndarray
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def load_images(
    paths: Sequence[str | os.PathLike],
    size: int | Sequence[int],
    channels: int,
    *,
    skip_bad: bool = False,
    workers: int | None = None,
) -> LoadedImages:
    """Decode and resize many images in a thread pool (Pillow releases the GIL while decoding).

    With ``skip_bad`` unreadable files are left out and listed in ``skipped``; otherwise the
    first one raises :class:`ImageReadError`.
    """
    paths = [Path(p) for p in paths]
    out_size = as_size(size)
    n_workers = workers or min(8, (os.cpu_count() or 1) + 1)

    def one(path: Path) -> np.ndarray | str:
        try:
            return read_image(path, channels=channels, size=out_size)
        except ImageReadError as exc:
            if not skip_bad:
                raise
            return str(exc)

    if len(paths) > 1 and n_workers > 1:
        with ThreadPoolExecutor(n_workers) as pool:
            results = list(pool.map(one, paths))
    else:
        results = [one(p) for p in paths]
    kept = [(p, r) for p, r in zip(paths, results) if not isinstance(r, str)]
    skipped = [(p, r) for p, r in zip(paths, results) if isinstance(r, str)]
    h, w = out_size
    if kept:
        pixels = np.stack([r for _, r in kept]).transpose(0, 3, 1, 2)
    else:
        pixels = np.zeros((0, channels, h, w), dtype=np.uint8)
    return LoadedImages(np.ascontiguousarray(pixels), [p for p, _ in kept], skipped)
