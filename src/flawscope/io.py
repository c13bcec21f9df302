"""Atomic file writes: a temporary file in the same folder, fsync, rename onto the target.

Used for everything flawscope writes (model files, checkpoints, reports, CSVs, overlays), so an
interrupted write never leaves a half-written file under the real name. The file gets the
mode a plain ``open()`` would give it (``0o666`` minus the umask), not ``mkstemp``'s ``0o600``,
so a service account can read a model written by another user. Temporary files of writes that
were killed (``kill -9``, power loss) are named ``.NAME.*.tmp``; the next write of ``NAME``
removes those older than :data:`STALE_SECONDS`.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

#: a temporary file of a write that is older than this was left by a killed process
STALE_SECONDS = 3600.0


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: Path, older_than: float = STALE_SECONDS) -> list[Path]:
    """Delete ``.NAME.*.tmp`` files beside ``path`` older than ``older_than`` seconds."""
    removed = []
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # raced with another writer, or not ours to delete
            continue
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def printable(text: str) -> str:
    """``text`` with the lone surrogates of a file name that is not valid UTF-8 written as
    ``\\udcff`` escapes: safe for UTF-8 files, HTML and plot titles."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8. File names that are not valid UTF-8 reach here as lone
    surrogates (``surrogateescape``); they are written escaped (``bad\\udcff.png``), as the
    CLI prints them, so a report or table of such a folder never fails."""
    return atomic_write(
        path, lambda p: p.write_text(text, encoding="utf-8", errors="backslashreplace"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early (before hours of training) when ``path`` cannot be written.

    Creates the parent folder if needed and tries a temporary file there; raises
    :class:`~flawscope.errors.ConfigError` naming the path otherwise.
    """
    from flawscope.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be written ({exc.strerror or exc})") from None
    return path
