"""The ONNX files flawscope writes, detectors and classifiers alike: one metadata schema, one
reader, onnxruntime sessions (torch-free: the runtime side needs no exporter).

Every export carries these ``metadata_props`` (text values):

``flawscope_format``          ``flawscope-onnx`` (detector) or ``flawscope-onnx-classifier``
``flawscope_format_version``  a whole number (:data:`FORMAT_VERSION`)
``kind``                      ``detector`` or ``classifier``
``flawscope_version``         the version that wrote it
``input_size``, ``channels``  what the graph's ``image`` input takes (``uint8 N x C x H x W``)
``exporter``, ``exported_at``, ``parity``  how it was made and checked
                                           (:mod:`flawscope.export`)

plus the kind's own fields (a detector's threshold and normalisation, a classifier's labels
and normalisation), checked by :func:`flawscope.schema.onnx_header` with the same rules and
limits as a model file's header before anything is allocated for an image. Classifier exports
written before the schema was shared (``format`` / ``format_version`` / ``image_size``) are
read through :func:`normalize_metadata`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from flawscope import __version__
from flawscope.errors import ConfigError, ModelFileError

FORMAT_KEY = "flawscope_format"
VERSION_KEY = "flawscope_format_version"
#: the ``flawscope_format`` value of each kind of export
FORMATS = {"detector": "flawscope-onnx", "classifier": "flawscope-onnx-classifier"}
FORMAT_VERSION = 1
INPUT_NAME = "image"
DETECTOR_OUTPUTS = ("score", "normalized_score", "anomaly_map", "is_defect")
CLASSIFIER_OUTPUTS = ("probabilities",)
#: legacy classifier keys -> the shared schema's keys
_LEGACY_KEYS = {"format": FORMAT_KEY, "format_version": VERSION_KEY, "image_size": "input_size"}


def base_metadata(kind: str, input_size: tuple[int, int], channels: int,
                  exporter: str) -> dict[str, str]:
    """The fields every export carries (the kind adds its own)."""
    h, w = input_size
    return {
        FORMAT_KEY: FORMATS[kind],
        VERSION_KEY: str(FORMAT_VERSION),
        "kind": kind,
        "flawscope_version": __version__,
        "input_size": f"[{h}, {w}]",
        "channels": str(channels),
        "exporter": exporter,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def normalize_metadata(meta: dict[str, str]) -> dict[str, str]:
    """``meta`` in the shared schema: legacy classifier keys renamed, ``kind`` filled in."""
    meta = dict(meta)
    if FORMAT_KEY not in meta and meta.get("format") == FORMATS["classifier"]:
        for old, new in _LEGACY_KEYS.items():
            if old in meta and new not in meta:
                meta[new] = meta.pop(old)
    if "kind" not in meta:
        kinds = {fmt: kind for kind, fmt in FORMATS.items()}
        if meta.get(FORMAT_KEY) in kinds:
            meta["kind"] = kinds[meta[FORMAT_KEY]]
    return meta


# ---------------------------------------------------------------------------- sessions
def onnx_session(model: bytes | str, device: str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime session (CUDA first when ``device`` is not ``cpu`` and it is there);
    ``model``: a file path or the serialised model."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed: pip install 'flawscope[export]'") from None

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model, opts, providers=providers)


def graph_batch_size_of_session(session: Any) -> int | None:
    """The graph's fixed batch size, or None when the batch axis is dynamic."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def check_graph_input(path: Path, session: Any, channels: int, size: tuple[int, int]) -> None:
    """The graph's input (``N x C x H x W``) must take the images the metadata describes."""
    shape = list(session.get_inputs()[0].shape)
    want = [channels, *size]
    fixed = [(got, w) for got, w in zip(shape[1:], want) if isinstance(got, int)]
    if len(shape) != 4 or any(got != w for got, w in fixed):
        raise ModelFileError(
            f"{path}: input_size / channels: the metadata says {channels} x {size[0]} x "
            f"{size[1]} but the graph's input is {' x '.join(map(str, shape))}")


def is_onnx_file(path: str | os.PathLike) -> bool:
    """True for an ``.onnx`` name, or content that starts like an ONNX ModelProto and not
    like a safetensors file."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return False
    # ONNX: field 1 (ir_version, a varint) has the tag byte 0x08, then a small number
    return len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 32


def onnx_kind(path: str | os.PathLike) -> str | None:
    """``detector`` / ``classifier`` for a flawscope ONNX export, else None (never raises)."""
    try:
        if not is_onnx_file(path):
            return None
        meta = onnx_session(str(path), "cpu", 1).get_modelmeta().custom_metadata_map
        kind = normalize_metadata(dict(meta)).get("kind")
        return kind if kind in FORMATS else None
    except Exception:
        return None


def open_export(
    path: str | os.PathLike, kind: str, *, device: str = "cpu", threads: int | None = None,
) -> tuple[Any, Any, dict[str, str]]:
    """``(session, header, metadata)`` of the flawscope ONNX export ``path`` of ``kind``.

    Everything is checked before the caller runs an image: readable by onnxruntime, written
    by flawscope as this kind, a format version this flawscope reads, the kind's fields
    (:func:`flawscope.schema.onnx_header`) and a graph input that matches them. Each problem
    is a :class:`ModelFileError` naming the file and the field.
    """
    from flawscope.schema import SchemaError, check_format_version, onnx_header

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, expected an .onnx model file")
    try:
        session = onnx_session(str(path), device, threads)
    except ConfigError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable ONNX {kind} ({exc})") from None
    meta = normalize_metadata(dict(session.get_modelmeta().custom_metadata_map))
    found = meta.get("kind") if meta.get(FORMAT_KEY) in FORMATS.values() else None
    if found is None:
        raise ModelFileError(
            f"{path}: not a flawscope model file (ONNX without flawscope metadata; "
            f"export it with `flawscope {'classify ' if kind == 'classifier' else ''}export`)")
    if found != kind or meta.get(FORMAT_KEY) != FORMATS[kind]:
        raise ModelFileError(f"{path}: is an exported {found}, expected an exported {kind}")
    try:  # the same checks and limits as a model file's header, before any image
        check_format_version(meta.get(VERSION_KEY), VERSION_KEY, newest=FORMAT_VERSION,
                             written_by=meta.get("flawscope_version"), what="ONNX format")
        _, header = onnx_header(kind, meta)
    except SchemaError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    check_graph_input(path, session, header.channels, header.input_size)
    return session, header, meta
