"""The typed, checked configuration stored in a model file's header.

A model file's JSON configuration is data a person can edit, so every value that drives
memory use or a verdict is checked on load before anything is built from it:

* input sizes (``input_size``, ``image_size``, ``tile_input_size``, learned ``input_size_``,
  anywhere in the architecture) are whole numbers from 1 to :data:`MAX_SIDE` per side;
* channels are 1 (gray) or 3 (RGB);
* the detector name is one of the registry's (:mod:`flawscope.models`);
* the threshold rule is known and every threshold and normalisation number is finite
  (:meth:`Threshold.from_dict`, :meth:`ScoreNormalization.from_dict`).

The same checks apply to the ``metadata_props`` of exported ``.onnx`` files
(:func:`onnx_header`, for both kinds of export), whose values
are text: the format version must be a whole number, and sizes, channels, threshold and
normalisation pass the checks above before the runtime allocates anything for an image.

A violation raises :class:`SchemaError` naming the field (``threshold.value: expected a finite
number, got nan``); :func:`flawscope.modelfile.load_model` prefixes the file name. Plain
dataclasses and explicit checks: pydantic is only a dependency of the ``serve`` extra.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flawscope.errors import ConfigError, ModelFileError
from flawscope.threshold import ScoreNormalization, Threshold

#: the largest image side (pixels) a model file may ask for; larger sizes would allocate
#: gigabytes per image
MAX_SIDE = 4096
CHANNELS = (1, 3)
#: architecture keys that hold an image size (an int or ``[height, width]``)
SIZE_KEYS = frozenset({"image_size", "input_size", "input_size_", "tile_input_size"})
#: architecture keys that hold a channel count (``None`` allowed: detect from the images)
CHANNEL_KEYS = frozenset({"channels", "channels_"})


class SchemaError(ModelFileError):
    """A configuration field is missing, of the wrong type or out of bounds."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _require(config: dict[str, Any], key: str, prefix: str = "") -> Any:
    if key not in config:
        raise SchemaError(prefix + key, "missing")
    return config[key]


def _object(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(field, f"expected an object, got {_kind(value)}")
    return value


def check_size(value: object, field: str) -> tuple[int, int]:
    """An image size (int or ``[h, w]``) with every side in ``1..MAX_SIDE``."""
    sides = [value] if not isinstance(value, (list, tuple)) else list(value)
    if len(sides) not in (1, 2) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in sides
    ):
        raise SchemaError(field, f"expected a size in pixels (int or [height, width]), "
                          f"got {value!r}")
    for v in sides:
        if not 1 <= v <= MAX_SIDE:
            raise SchemaError(field, f"{v} pixels is outside 1..{MAX_SIDE}")
    h, w = (sides[0], sides[0]) if len(sides) == 1 else sides
    return h, w


def check_version(value: object, field: str = "format_version") -> int:
    """A format version: a whole number from 1 (as a number or its decimal text)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SchemaError(field, f"expected a whole number, got {value!r}")
    return value


def check_format_version(
    value: object, field: str, *, newest: int, oldest: int = 1, written_by: object = None,
    what: str = "model format",
) -> int:
    """A format version this flawscope reads: whole, at least ``oldest``, at most ``newest``
    (a newer file says which flawscope ``written_by`` wrote it and to upgrade)."""
    from flawscope import __version__

    version = check_version(value, field)
    if version > newest:
        raise SchemaError(field, f"written by flawscope {written_by} in {what} {version}; "
                          f"this flawscope ({__version__}) reads up to {newest}; "
                          "upgrade flawscope")
    if version < oldest:
        raise SchemaError(field, f"{version} is older than the oldest {what} this flawscope "
                          f"reads ({oldest})")
    return version


def check_channels(value: object, field: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value not in CHANNELS:
        raise SchemaError(field, f"expected 1 (gray) or 3 (RGB), got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_finite_list(value: object, field: str, *, positive: bool = False) -> list[float]:
    if not isinstance(value, list) or not value:
        raise SchemaError(field, f"expected a list of numbers, got {_kind(value)}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SchemaError(f"{field}[{i}]", f"expected a finite number, got {v!r}")
        if positive and v <= 0:
            raise SchemaError(f"{field}[{i}]", f"expected a positive number, got {v!r}")
    return [float(v) for v in value]


def check_pixel_threshold(section: object, field: str = "pixel_threshold"
                          ) -> dict[str, Any] | None:
    """A stored ``pixel_threshold`` section (None: absent, older model files): an object with
    a finite ``value``."""
    if section is None:
        return None
    if not isinstance(section, dict) or "value" not in section:
        raise SchemaError(field, f"expected an object with 'value', got {section!r}")
    value = section["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise SchemaError(f"{field}.value", f"expected a finite number, got {value!r}")
    return {**section, "value": float(value)}


def _walk_architecture(value: object, field: str) -> None:
    """Check every size and channel key anywhere in a (possibly nested) architecture."""
    if isinstance(value, dict):
        for key, v in value.items():
            sub = f"{field}.{key}"
            if key in SIZE_KEYS and v is not None:
                check_size(v, sub)
            elif key in CHANNEL_KEYS:
                check_channels(v, sub, allow_none=key == "channels")
            else:
                _walk_architecture(v, sub)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk_architecture(v, f"{field}[{i}]")


def _from_dict(make: Callable[[Any], Any], value: object, field: str) -> Any:
    try:
        return make(value)
    except ConfigError as exc:  # messages start with the field name
        text = str(exc)
        name, _, problem = text.partition(": ")
        raise SchemaError(name if name.startswith(field) else field,
                          problem if name.startswith(field) else text) from None


@dataclass(frozen=True)
class VerdictHeader:
    """What a detector's verdicts need, in a model file and in its ONNX export alike."""

    model: str
    input_size: tuple[int, int]
    channels: int
    threshold: Threshold
    normalization: ScoreNormalization
    info: dict[str, Any]
    #: the calibrated pixel threshold of defect regions (None: the image threshold is used)
    pixel_threshold: dict[str, Any] | None


@dataclass(frozen=True)
class DetectorHeader(VerdictHeader):
    """The checked configuration of a detector model file (``kind == "detector"``)."""

    architecture: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: object) -> DetectorHeader:
        """Check ``config`` (as :meth:`Inspector.metadata` + ``architecture`` wrote it)."""
        from flawscope.models import list_models  # registers the detectors

        config = _object(config, "config")
        model = _require(config, "model")
        if model not in list_models():
            raise SchemaError("model", f"unknown detector {model!r}; this flawscope knows "
                              f"{', '.join(list_models())}")
        input_size = check_size(_require(config, "input_size"), "input_size")
        channels = check_channels(_require(config, "channels"), "channels")
        threshold = _from_dict(Threshold.from_dict, _require(config, "threshold"), "threshold")
        normalization = _from_dict(ScoreNormalization.from_dict,
                                   _require(config, "normalization"), "normalization")
        architecture = _object(_require(config, "architecture"), "architecture")
        _object(_require(architecture, "params", "architecture."), "architecture.params")
        _object(_require(architecture, "learned", "architecture."), "architecture.learned")
        _walk_architecture(architecture, "architecture")
        info = _object(config.get("info", {}), "info")
        pixel = check_pixel_threshold(config.get("pixel_threshold"))
        return cls(model, input_size, channels, threshold, normalization, info, pixel,
                   architecture)


@dataclass(frozen=True)
class ClassifierHeader:
    """The checked configuration of a classifier model file (``kind == "classifier"``)."""

    labels: list[str]
    backbone: str
    image_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    fold_count: int
    #: the whole checked configuration (augmentation, TTA, label classes, OOF metrics, ...)
    config: dict[str, Any]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_size

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def from_config(cls, config: object) -> ClassifierHeader:
        config = _object(config, "config")
        labels = _require(config, "labels")
        if (not isinstance(labels, list) or not labels
                or not all(isinstance(v, str) for v in labels)):
            raise SchemaError("labels", "expected a non-empty list of label names")
        if len(set(labels)) != len(labels):
            raise SchemaError("labels", "label names repeat")
        backbone = _require(config, "backbone")
        if not isinstance(backbone, str) or not backbone:
            raise SchemaError("backbone", f"expected a timm model name, got {backbone!r}")
        size = check_size(_require(config, "image_size"), "image_size")
        if "channels" in config:
            check_channels(config["channels"], "channels")
        mean = check_finite_list(_require(config, "mean"), "mean")
        std = check_finite_list(_require(config, "std"), "std", positive=True)
        if len(mean) not in CHANNELS or len(std) != len(mean):
            raise SchemaError("std", f"{len(mean)} means and {len(std)} standard deviations; "
                              "expected 1 or 3 of each")
        folds = _require(config, "fold_count")
        if isinstance(folds, bool) or not isinstance(folds, int) or not 1 <= folds <= 100:
            raise SchemaError("fold_count", f"expected a whole number 1..100, got {folds!r}")
        return cls(list(labels), backbone, size, mean, std, folds, config)


#: checks per model-file kind; kinds not listed are only checked for being a JSON object
VALIDATORS: dict[str, Callable[[object], object]] = {
    "detector": DetectorHeader.from_config,
    "classifier": ClassifierHeader.from_config,
}


def validate_config(kind: str, config: object) -> object:
    """The typed header for ``kind`` (raises :class:`SchemaError` naming the field)."""
    check = VALIDATORS.get(kind)
    if check is None:
        return _object(config, "config")
    return check(config)


# ---------------------------------------------------------------------------- ONNX metadata
_MISSING = object()


def _meta_json(meta: Mapping[str, str], key: str, default: object = _MISSING) -> Any:
    """The JSON value of the text field ``key`` of ONNX ``metadata_props``."""
    raw = meta.get(key)
    if raw is None:
        if default is _MISSING:
            raise SchemaError(key, "missing")
        return default
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        raise SchemaError(key, f"not valid JSON: {raw[:60]!r}") from None


def _meta_int(meta: Mapping[str, str], key: str) -> int:
    raw = _require(dict(meta), key)
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw.strip())
    raise SchemaError(key, f"expected a whole number, got {raw!r}")


#: how heat maps of an exported detector are scaled (:func:`flawscope.pipeline.map_scale`)
MAP_SCALES = ("score", "image")


@dataclass(frozen=True)
class OnnxDetectorHeader(VerdictHeader):
    """The checked ``metadata_props`` of an exported detector (``flawscope export``)."""

    format_version: int = 1
    #: how heat maps are scaled (:data:`MAP_SCALES`)
    map_scale: str = "image"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> OnnxDetectorHeader:
        version = check_version(meta.get("flawscope_format_version"),
                                "flawscope_format_version")
        model = meta.get("model")
        if not isinstance(model, str) or not model:
            raise SchemaError("model", f"expected a detector name, got {model!r}")
        input_size = check_size(_meta_json(meta, "input_size"), "input_size")
        channels = check_channels(_meta_int(meta, "channels"), "channels")
        threshold = _from_dict(Threshold.from_dict, _meta_json(meta, "threshold"), "threshold")
        normalization = _from_dict(ScoreNormalization.from_dict,
                                   _meta_json(meta, "normalization"), "normalization")
        info = _object(_meta_json(meta, "info", {}), "info")
        scale = meta.get("map_scale", "image")
        if scale not in MAP_SCALES:
            raise SchemaError("map_scale", f"expected one of {', '.join(MAP_SCALES)}, "
                              f"got {scale!r}")
        pixel = check_pixel_threshold(_meta_json(meta, "pixel_threshold", None))
        return cls(model, input_size, channels, threshold, normalization, info, pixel,
                   version, scale)


#: an exported classifier's JSON fields beyond the header's own (default when absent)
_CLASSIFIER_JSON_FIELDS = {"label_classes": {}, "augment": {}, "oof": {}, "two_stage": None}


def classifier_header_from_metadata(meta: Mapping[str, str]) -> tuple[int, ClassifierHeader]:
    """``(format_version, header)`` of an exported classifier's ``metadata_props`` (in the
    shared schema, :func:`flawscope.onnxformat.normalize_metadata`)."""
    version = check_version(meta.get("flawscope_format_version"), "flawscope_format_version")
    config: dict[str, Any] = {key: _meta_json(meta, key) for key in ("labels", "mean", "std")}
    config["image_size"] = list(check_size(_meta_json(meta, "input_size"), "input_size"))
    config["backbone"] = meta.get("backbone", "?")
    config["fold_count"] = _meta_int(meta, "fold_count")
    config["tta"] = meta.get("tta", "none")
    if "channels" in meta:
        config["channels"] = _meta_int(meta, "channels")
    for key, default in _CLASSIFIER_JSON_FIELDS.items():
        value = _meta_json(meta, key, default)
        if value is not None:
            config[key] = _object(value, key)
    header = ClassifierHeader.from_config(config)
    return version, header


def onnx_header(kind: str, meta: Mapping[str, str]
                ) -> tuple[int, OnnxDetectorHeader | ClassifierHeader]:
    """``(format_version, typed header)`` of an export's ``metadata_props`` by ``kind``."""
    if kind == "detector":
        header = OnnxDetectorHeader.from_metadata(meta)
        return header.format_version, header
    if kind == "classifier":
        return classifier_header_from_metadata(meta)
    raise SchemaError("kind", f"expected detector or classifier, got {kind!r}")
