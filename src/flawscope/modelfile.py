"""Model files: one safetensors file, tensors plus a JSON header; loading never runs code.

The safetensors header holds ``flawscope`` metadata: format name and version, the flawscope
version that wrote it, the model kind, the JSON configuration (architecture, preprocessing,
threshold, normalisation, training summary) and a SHA-256 of all tensor bytes, checked on load
so a truncated or edited file is refused. Writes go to a temporary file that is renamed into
place, so an interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flawscope import __version__
from flawscope.errors import ModelFileError

FORMAT = "flawscope-model"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model(
    path: str | os.PathLike, kind: str, config: dict, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write a model file atomically."""
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "flawscope_version": __version__,
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
        "sha256": _digest(clean),
    }
    return atomic_write(path, lambda p: save_file(clean, str(p), metadata=meta))


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata, without loading tensors."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
        return header.get("__metadata__", {}) or {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(
            f"{path}: not a flawscope model file (no safetensors header: {exc})"
        ) from None


def load_model(path: str | os.PathLike, kind: str | None = None) -> tuple[dict, dict]:
    """Read ``(config, tensors)`` from a model file, refusing anything foreign or altered."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, expected a flawscope model file")
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a flawscope model file (no flawscope metadata)")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: written by flawscope {meta.get('flawscope_version')} in model format "
            f"{meta.get('format_version')}; this flawscope ({__version__}) reads up to "
            f"{FORMAT_VERSION}; upgrade flawscope"
        )
    if kind is not None and meta.get("kind") != kind:
        raise ModelFileError(f"{path}: is a {meta.get('kind')} model, expected a {kind} model")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: corrupt model file ({exc})") from None
    if _digest(tensors) != meta.get("sha256"):
        raise ModelFileError(f"{path}: checksum mismatch: the file was altered or is damaged")
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: model configuration unreadable ({exc})") from None
    return config, tensors
