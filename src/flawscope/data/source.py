"""Image sources: what a detector's ``fit`` and ``score`` accept.

A source is a list of image paths (or :class:`Sample` records), or an array of decoded
``uint8`` images ``N x C x H x W``. Paths are decoded lazily in batches, so a detector that
streams (PatchCore) holds only one batch of pixels at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from flawscope.data.dataset import Sample
from flawscope.data.images import as_size, load_images, resize
from flawscope.errors import ConfigError

ImageInput = Sequence[str | os.PathLike | Sample] | np.ndarray


def _paths(items: Sequence) -> list[Path]:
    return [Path(i.path) if isinstance(i, Sample) else Path(i) for i in items]


def _fit_array(arr: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """Bring an in-memory uint8 batch to ``channels`` and ``size``."""
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise ConfigError(
            f"image array: expected uint8 N x C x H x W, got {arr.dtype} {tuple(arr.shape)}"
        )
    c = arr.shape[1]
    if c == 1 and channels == 3:
        arr = np.repeat(arr, 3, axis=1)
    elif c == 3 and channels == 1:
        luma = arr[:, 0] * 0.299 + arr[:, 1] * 0.587 + arr[:, 2] * 0.114
        arr = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, None]
    elif c != channels:
        raise ConfigError(f"image array: {c} channels, model expects {channels}")
    if arr.shape[2:] != size:
        arr = np.stack([resize(a.transpose(1, 2, 0), size).transpose(2, 0, 1) for a in arr])
    return np.ascontiguousarray(arr)


def image_shapes(images: ImageInput, probe: int = 64) -> list[tuple[int, int]]:
    """``(height, width)`` of up to ``probe`` images spread over ``images``, read from the
    file headers (nothing is decoded)."""
    from flawscope.data.images import image_dimensions

    if isinstance(images, np.ndarray):
        h, w = images.shape[-2:]
        return [(int(h), int(w))]
    if len(images) == 0:
        raise ConfigError("no images given")
    step = max(1, len(images) // probe)
    return [image_dimensions(p) for p in _paths(images[::step][:probe])]


def iter_batches(
    images: ImageInput,
    size: int | Sequence[int],
    channels: int,
    batch_size: int = 32,
    *,
    skip_bad: bool = False,
) -> Iterator[tuple[np.ndarray, list[Path] | None]]:
    """Yield ``(uint8 N x C x H x W batch, paths or None)``; bad files raise unless skipped."""
    hw = as_size(size)
    if isinstance(images, np.ndarray):
        for i in range(0, len(images), batch_size):
            yield _fit_array(images[i : i + batch_size], hw, channels), None
        return
    paths = _paths(images)
    for i in range(0, len(paths), batch_size):
        loaded = load_images(paths[i : i + batch_size], hw, channels, skip_bad=skip_bad)
        yield loaded.pixels, loaded.paths


def to_array(
    images: ImageInput, size: int | Sequence[int], channels: int, batch_size: int = 64
) -> np.ndarray:
    """Decode everything into one ``uint8`` array (for models that train for many epochs)."""
    parts = [b for b, _ in iter_batches(images, size, channels, batch_size)]
    h, w = as_size(size)
    return np.concatenate(parts) if parts else np.zeros((0, channels, h, w), np.uint8)


def native_channels(images: ImageInput, probe: int = 8) -> int:
    """1 if the images are gray (also RGB files whose channels agree within 2 levels), else 3.

    Looks at the first ``probe`` images.
    """
    from flawscope.data.images import read_image

    if isinstance(images, np.ndarray):
        if images.ndim == 3 or images.shape[1] == 1:
            return 1
        arrays = [a.transpose(1, 2, 0) for a in images[:probe]]
    else:
        paths = _paths(images[:probe])
        if not paths:
            raise ConfigError("no images given")
        arrays = [read_image(p) for p in paths]
    for a in arrays:
        if a.shape[2] == 3:
            spread = a.max(axis=2).astype(np.int16) - a.min(axis=2).astype(np.int16)
            if spread.max() > 2:
                return 3
    return 1
