"""Content fingerprints of images: which images a model was trained on.

A model file keeps one 64-bit BLAKE2b digest of each training image's file bytes (8 bytes per
image: 23 kB for 2,875 images), so ``flawscope calibrate`` can refuse to set a threshold on
images the detector has already seen, whose scores are optimistically low. Only exact copies
are found (a re-encoded or resized copy has other bytes); that is the common mistake
(calibrating on the training folder), and it costs no decoding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from flawscope.data.source import ImageInput, _paths


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def fingerprints(images: ImageInput) -> np.ndarray:
    """``int64`` digest per image: of the file bytes for paths, of the pixels for arrays."""
    if isinstance(images, np.ndarray):
        return np.array([_digest(np.ascontiguousarray(a).tobytes()) for a in images], np.int64)
    return np.array([_digest(p.read_bytes()) for p in _paths(images)], np.int64)


def seen_before(images: ImageInput, known: np.ndarray) -> list[int]:
    """Indices of ``images`` whose fingerprint is in ``known``."""
    if len(known) == 0 or len(images) == 0:
        return []
    return np.flatnonzero(np.isin(fingerprints(images), known)).tolist()


def describe_seen(images: Sequence, index: list[int], limit: int = 3) -> str:
    """``'a.png, b.png and 4 more'`` for the images at ``index``."""
    names = [str(_paths([images[i]])[0].name) for i in index[:limit]]
    more = f" and {len(index) - limit} more" if len(index) > limit else ""
    return ", ".join(names) + more
