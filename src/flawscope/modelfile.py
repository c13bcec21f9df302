"""Model files: one safetensors file, tensors plus a JSON header; loading never runs code.

The safetensors header holds ``flawscope`` metadata: format name and version, the flawscope
version that wrote it, the model kind, the JSON configuration (architecture, preprocessing,
threshold, normalisation, training summary), ``sha256`` (of all tensor bytes) and, from format
2 on, ``header_sha256`` (of every other metadata field, ``sha256`` included), so an edit of
the settings is caught as well as one of the weights. Writes go to a temporary file that is
renamed into place, so an interrupted save never leaves a half-written model.

Loading checks, in order: the header is flawscope's and of a version this code reads; the
configuration is a JSON object that passes the checks of its kind (:mod:`flawscope.schema`:
finite threshold, sizes within bounds, known detector ...); the header checksum; the tensor
checksum. Anything wrong raises :class:`~flawscope.errors.ModelFileError`, one line naming the
file and the field.

Versions: format 1 files (checksum of the tensors only) are refused by default, because an
edited format-1 file is indistinguishable from an intact one: setting ``format_version`` to 1
and dropping ``header_sha256`` must not be a way around the header checksum. They load (after
the same checks of their configuration, with a logged warning) only when the caller says so:
``allow_legacy=True`` here and in ``Inspector.load`` / ``Classifier.load`` /
``load_any_model``, :func:`legacy_models_allowed` around a block, or ``--allow-legacy-model``
on the CLI. :func:`upgrade_model_file` (``flawscope modelfile upgrade FILE``) re-signs a file
in the current format, only after every check passes. ``MIGRATIONS`` maps a format version to
the function that turns its configuration into the next version's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flawscope import __version__
from flawscope.errors import ModelFileError
from flawscope.io import atomic_write
from flawscope.schema import SchemaError, check_format_version, validate_config

log = logging.getLogger(__name__)

FORMAT = "flawscope-model"
#: 1: ``sha256`` covers the tensors only; 2: ``header_sha256`` covers the other metadata too
FORMAT_VERSION = 2
#: the oldest format this code reads
OLDEST_FORMAT_VERSION = 1


#: whether files older than :data:`LEGACY_BELOW` load when ``allow_legacy`` is not given
_ALLOW_LEGACY: ContextVar[bool] = ContextVar("flawscope_allow_legacy_models", default=False)
#: formats below this have no checksum of their settings (refused unless allowed)
LEGACY_BELOW = 2
#: the CLI option that allows them (named in the refusal)
LEGACY_OPTION = "--allow-legacy-model"


@contextlib.contextmanager
def legacy_models_allowed(allow: bool = True) -> Iterator[None]:
    """Within the block, model loads that do not pass ``allow_legacy`` accept format-1 files
    (the CLI's ``--allow-legacy-model``)."""
    token = _ALLOW_LEGACY.set(allow)
    try:
        yield
    finally:
        _ALLOW_LEGACY.reset(token)


def _migrate_1_to_2(config: dict[str, Any]) -> dict[str, Any]:
    """Format 2 changed the checksum only; the configuration is the same."""
    return config


#: ``{version: function turning a configuration of that version into the next one's}``
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _migrate_1_to_2}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _header_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of every metadata field but ``header_sha256`` itself (canonical JSON)."""
    fields = {k: v for k, v in meta.items() if k != "header_sha256"}
    text = json.dumps(fields, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def save_model(
    path: str | os.PathLike, kind: str, config: dict, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write a model file atomically, in the current format (checksums of header and tensors).

    The configuration must pass the checks of its kind (:mod:`flawscope.schema`), so a file
    that would be refused on load is never written.
    """
    try:
        validate_config(kind, json.loads(json.dumps(config)))
    except SchemaError as exc:
        raise ModelFileError(f"{path}: refusing to write an invalid model file: {exc}") from None
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "flawscope_version": __version__,
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
        "sha256": _digest(clean),
    }
    meta["header_sha256"] = _header_digest(meta)
    return atomic_write(path, lambda p: save_file(clean, str(p), metadata=meta))


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata, without loading tensors."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(
            f"{path}: not a flawscope model file (no safetensors header: {exc})"
        ) from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a flawscope model file (its header is a JSON "
                             f"{_json_kind(header)}, expected an object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: not a flawscope model file (__metadata__ is a JSON "
                             f"{_json_kind(meta)}, expected an object)")
    return meta


def _json_kind(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _format_version(path: Path, meta: dict[str, Any]) -> int:
    try:
        return check_format_version(
            meta.get("format_version"), "format_version", newest=FORMAT_VERSION,
            oldest=OLDEST_FORMAT_VERSION, written_by=meta.get("flawscope_version"))
    except SchemaError as exc:
        raise ModelFileError(f"{path}: {exc}") from None


def load_model(
    path: str | os.PathLike, kind: str | None = None, *, allow_legacy: bool | None = None,
    warn_old: bool = True,
) -> tuple[dict, dict]:
    """``(config, tensors)`` of a model file: :func:`read_model` without the typed header
    (``config`` is the checked, migrated JSON configuration)."""
    loaded = read_model(path, kind, allow_legacy=allow_legacy, warn_old=warn_old)
    return loaded.config, loaded.tensors


@dataclass(frozen=True)
class LoadedModel:
    """A model file read and checked once: its kind, the typed header of that kind
    (:class:`~flawscope.schema.DetectorHeader`, :class:`~flawscope.schema.ClassifierHeader`,
    or the configuration object for other kinds), the configuration and the tensors."""

    path: Path
    kind: str
    header: Any
    config: dict[str, Any]
    tensors: dict[str, Any]


def read_model(
    path: str | os.PathLike, kind: str | None = None, *, allow_legacy: bool | None = None,
    warn_old: bool = True,
) -> LoadedModel:
    """Read a model file, refusing anything foreign or altered.

    The configuration has passed the checks of its kind (:func:`flawscope.schema.
    validate_config`, whose typed result is ``header``) and is migrated to the current
    format. ``allow_legacy``: accept files of a format whose settings are not covered by a
    checksum (format 1); ``None``: as :func:`legacy_models_allowed` says (default: refuse).
    ``warn_old``: log a warning when such a file is loaded.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, expected a flawscope model file")
    meta = read_metadata(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a flawscope model file (no flawscope metadata)")
    version = _format_version(path, meta)
    file_kind = meta.get("kind")
    if not isinstance(file_kind, str):
        raise ModelFileError(f"{path}: kind: expected a model kind, got {file_kind!r}")
    if kind is not None and file_kind != kind:
        raise ModelFileError(f"{path}: is a {file_kind} model, expected a {kind} model")
    header_ok = version < 2 or meta.get("header_sha256") == _header_digest(meta)
    edited = "" if header_ok else (
        " (and the header checksum does not match: the file was edited or damaged)")
    raw_config = meta.get("config")
    if not isinstance(raw_config, str):
        raise ModelFileError(f"{path}: config: missing or not a JSON text{edited}")
    try:
        config = json.loads(raw_config)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: config: not valid JSON ({exc}){edited}") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: config: expected a JSON object{edited}")
    for v in range(version, FORMAT_VERSION):
        config = MIGRATIONS[v](config)
    try:
        header = validate_config(file_kind, config)
    except SchemaError as exc:
        raise ModelFileError(f"{path}: {exc}{edited}") from None
    if not header_ok:
        raise ModelFileError(
            f"{path}: header checksum mismatch: the settings (config, kind or version) were "
            "edited or are damaged")
    if version < LEGACY_BELOW and not (
            _ALLOW_LEGACY.get() if allow_legacy is None else allow_legacy):
        raise ModelFileError(
            f"{path}: model format {version} has no checksum of its settings (threshold, "
            f"sizes), so an edit cannot be detected; refused. If the file is intact, re-sign "
            f"it with `flawscope modelfile upgrade {path}`, or load it as it is with "
            f"{LEGACY_OPTION}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: corrupt model file ({exc})") from None
    if _digest(tensors) != meta.get("sha256"):
        raise ModelFileError(
            f"{path}: tensor checksum mismatch: the weights were altered or are damaged")
    if version < LEGACY_BELOW and warn_old:
        log.warning(
            "%s: model format %d: its checksum covers the weights but not the settings; "
            "re-sign it in format %d to protect them (flawscope modelfile upgrade %s)",
            path, version, FORMAT_VERSION, path)
    return LoadedModel(path, file_kind, header, config, tensors)


def upgrade_model_file(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Rewrite a model file of an older format in the current one (atomically).

    The file must pass every check of :func:`load_model` first (format, kind, configuration
    schema, header checksum where it has one, tensor checksum), so only an intact file gets
    the new header checksum; a format-1 file's settings cannot be verified, so the caller
    vouches for them by upgrading. ``out`` defaults to ``path`` (replaced in place).
    """
    config, tensors = load_model(path, allow_legacy=True, warn_old=False)
    meta = read_metadata(Path(path))
    return save_model(out or path, str(meta["kind"]), config, tensors)


def main(argv: list[str] | None = None) -> int:
    """``python -m flawscope.modelfile upgrade FILE [OUT]``: as ``flawscope modelfile
    upgrade FILE [-o OUT]``."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3) or args[0] != "upgrade":
        print("usage: python -m flawscope.modelfile upgrade FILE [OUT]", file=sys.stderr)
        return 2
    from flawscope.cli import main as cli_main

    return cli_main(["modelfile", "upgrade", args[1], *(["-o", args[2]] if len(args) == 3
                                                         else [])])


if __name__ == "__main__":
    raise SystemExit(main())
