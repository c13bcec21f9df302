"""The content-addressed image folder: ``ROOT/ab/<sha256>.<ext>``.

A file's name is the SHA-256 of its bytes, so an image sent twice is stored once and a file
can be checked against its name. Writes are atomic and durable (a temporary file, fsync,
rename, fsync of the folder): a file either is complete or is not there. Rewriting an
existing file only touches its time, which :meth:`ImageFolder.remove_unreferenced` reads so
that it never deletes a file being reused.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_NAME = re.compile(r"^([0-9a-f]{64})\.([a-z0-9]{1,8})$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_suffix(data: bytes) -> str:
    """The file suffix of encoded image ``data``, from its first bytes (the formats the
    service accepts); ``bin`` if unknown."""
    head = data[:12]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"GIF8",):
        return "gif"
    if head[:1] == b"P" and head[1:2] in b"123456" and len(head) > 1:
        return "ppm"
    return "bin"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; renames are durable there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ImageFolder:
    """Files named by their content under ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, digest: str, suffix: str) -> Path:
        return self.root / digest[:2] / f"{digest}.{suffix}"

    def put(self, data: bytes, suffix: str, digest: str | None = None) -> tuple[str, bool]:
        """Store ``data``; returns (its SHA-256, True if the file was new)."""
        digest = digest or sha256(data)
        target = self.path(digest, suffix)
        if target.exists():
            os.utime(target)  # in use again: not removable as unreferenced for a while
            return digest, False
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)  # the new name, too, survives a power cut
        return digest, True

    def read(self, digest: str, suffix: str) -> bytes | None:
        try:
            return self.path(digest, suffix).read_bytes()
        except FileNotFoundError:
            return None

    def files(self) -> Iterator[tuple[str, Path]]:
        """(digest, path) of every stored file."""
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for p in sub.iterdir():
                m = _NAME.match(p.name)
                if m:
                    yield m.group(1), p

    def remove_unreferenced(self, referenced: set[str], grace_s: float = 600.0) -> tuple[int, int]:
        """Delete files whose digest is not in ``referenced`` and that were not written or
        reused in the last ``grace_s`` seconds; returns (files, bytes) removed."""
        cutoff = time.time() - grace_s
        n = size = 0
        for digest, p in list(self.files()):
            if digest in referenced:
                continue
            try:
                st = p.stat()
                if st.st_mtime > cutoff:
                    continue
                p.unlink()
            except FileNotFoundError:
                continue
            n += 1
            size += st.st_size
        return n, size

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for _, p in self.files())
