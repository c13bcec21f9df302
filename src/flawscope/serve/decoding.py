"""Upload bytes -> pixel arrays, with the same decoding policy as ``flawscope predict``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flawscope.data.images import convert_channels, decode_image, resize
from flawscope.errors import ImageReadError
from flawscope.serve.errors import UploadError

#: decoders the service accepts (Pillow's plugin names); everything else is refused
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")


def decode_upload(
    data: bytes, name: str, *, channels: int | None, size: tuple[int, int] | None,
    max_pixels: int,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Upload bytes -> (uint8 ``H x W x C`` at ``size``, upright original ``(width, height)``).

    ``channels`` / ``size`` None: as decoded (gray stays 1 channel), at the original size.

    The decoding policy of :func:`flawscope.data.images.decode_image` (pixel limit checked
    from the header before decoding, EXIF orientation applied), as ``flawscope predict``
    uses it, so a file scores the same through both; only the decoders are restricted to
    :data:`ALLOWED_FORMATS`. Raises :class:`UploadError`: 415 not an image, 422 otherwise.
    """
    try:
        return decode_image(data, name, channels=channels, size=size, max_pixels=max_pixels,
                            formats=ALLOWED_FORMATS)
    except ImageReadError as exc:
        status = 415 if getattr(exc, "reason", "") == "not-image" else 422
        raise UploadError(status, str(exc), name) from None


def decode_upload_views(
    data: bytes, name: str, views: Sequence[tuple[int, tuple[int, int]]], *, max_pixels: int
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Decode once, then one uint8 ``H x W x C`` per ``(channels, size)`` in ``views``.

    Each view equals :func:`decode_upload` with that ``channels`` and ``size`` (the same
    conversion and resize of the same decoded pixels), so the detector and the classifier
    each see the image as their own ``predict`` would read the file.
    """
    full, original = decode_upload(data, name, channels=None, size=None,
                                   max_pixels=max_pixels)
    return [resize(convert_channels(full, c), size) for c, size in views], original

