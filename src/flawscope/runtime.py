"""Running any flawscope model file: the PyTorch :class:`~flawscope.pipeline.Inspector` or an
exported ``.onnx`` (:class:`OnnxInspector`, onnxruntime), behind one API.

This is what ``predict``, ``evaluate`` and the service use; it does not need the exporter
(:mod:`flawscope.export` writes the ``.onnx`` files this module reads: format and the names
of inputs and outputs are defined here and shared).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flawscope import __version__
from flawscope.data.source import ImageInput, iter_batches
from flawscope.errors import ConfigError, ModelFileError
from flawscope.pipeline import Inspector, Prediction, Verdicts, check_pixel_threshold
from flawscope.regions import RegionRule
from flawscope.schema import OnnxDetectorHeader, SchemaError
from flawscope.threshold import ScoreNormalization, Threshold

ONNX_FORMAT = "flawscope-onnx"
ONNX_FORMAT_VERSION = 1
OUTPUT_NAMES = ("score", "normalized_score", "anomaly_map", "is_defect")
INPUT_NAME = "image"
#: images per onnxruntime call: 8 was the fastest and takes less memory than 16 (PatchCore,
#: 320 px, 2 cores, `flawscope predict` peak RSS: pill 1598 MB / 7.3 s at 8 vs 1988 MB /
#: 8.2 s at 16, bottle 1590 / 4.0 s vs 1967 / 4.2 s; PyTorch at its 16: 1709 MB / 17.4 s)
DEFAULT_ONNX_BATCH = 8


class InspectorLike(Protocol):
    """What the CLI, the report and the service need of a loaded model (both runtimes)."""

    runtime: str
    threshold: Threshold
    normalization: ScoreNormalization
    info: dict[str, Any]
    #: how heat maps are coloured: "score" or "image" (:func:`map_scale`)
    map_scale: str

    @property
    def input_size(self) -> tuple[int, int]: ...

    @property
    def channels(self) -> int: ...

    def score(self, images: ImageInput, with_maps: bool = True
              ) -> tuple[np.ndarray, np.ndarray | None]: ...

    def predict(self, images: ImageInput, **kwargs: Any) -> list[Prediction]: ...

    def region_rule(self, *args: Any, **kwargs: Any) -> RegionRule: ...

    def metadata(self) -> dict[str, Any]: ...


def map_scale(detector: Any) -> str:
    """How heatmaps are coloured: ``"score"`` when the image score is the maximum of the
    anomaly map (so the map shares the score's threshold and normalisation), else ``"image"``
    (each map scaled to its own range)."""
    return "score" if detector.score_is_map_max else "image"


def graph_batch_size_of_session(session: Any) -> int | None:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


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


def open_onnx_file(
    path: Path, device: str, threads: int | None, what: str
) -> tuple[Any, dict[str, str]]:
    """The onnxruntime session of the ``.onnx`` file ``path`` and the file's metadata map.

    A file onnxruntime cannot load is a :class:`ModelFileError` ("not a readable ONNX
    ``what``"); a missing onnxruntime stays the :class:`ConfigError` with the install hint.
    """
    try:
        session = onnx_session(str(path), device, threads)
    except ConfigError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable ONNX {what} ({exc})") from None
    return session, session.get_modelmeta().custom_metadata_map


def check_graph_input(
    path: Path, session: Any, channels: int, size: tuple[int, int]
) -> None:
    """The graph's input (``N x C x H x W``) must take the images the metadata describes."""
    shape = list(session.get_inputs()[0].shape)
    want = [channels, *size]
    fixed = [(got, w) for got, w in zip(shape[1:], want) if isinstance(got, int)]
    if len(shape) != 4 or any(got != w for got, w in fixed):
        raise ModelFileError(
            f"{path}: input_size / channels: the metadata says {channels} x {size[0]} x "
            f"{size[1]} but the graph's input is {' x '.join(map(str, shape))}")


# ---------------------------------------------------------------------------- inference
class OnnxInspector(Verdicts):
    """An exported ``.onnx`` model with the :class:`~flawscope.pipeline.Inspector` API.

    Images are decoded and resized by the same code as the PyTorch path; scores come from
    onnxruntime; verdict and normalised score are computed from the stored threshold and
    normalisation exactly as :meth:`Inspector.predict` does.
    """

    runtime = "onnxruntime"
    #: what an export does not carry: the PyTorch detector (``--statistics``, reconstructions)
    #: and the good images' calibration scores (operating points in ``evaluate``)
    detector = None
    calibration_scores = None

    def __init__(
        self, path: str | os.PathLike, *, device: str = "auto",
        batch_size: int = DEFAULT_ONNX_BATCH, threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ModelFileError(f"{self.path}: no such model file")
        if self.path.is_dir():
            raise ModelFileError(f"{self.path}: is a folder, expected an .onnx model file")
        self.session, meta = open_onnx_file(self.path, device, threads, "model")
        if meta.get("flawscope_format") != ONNX_FORMAT:
            raise ModelFileError(
                f"{self.path}: not a flawscope model file (ONNX without flawscope metadata; "
                "export it with `flawscope export`)"
            )
        try:  # the same checks and limits as a model file's header, before any image
            header = OnnxDetectorHeader.from_metadata(meta)
        except SchemaError as exc:
            raise ModelFileError(f"{self.path}: {exc}") from None
        if header.format_version > ONNX_FORMAT_VERSION:
            raise ModelFileError(
                f"{self.path}: written by flawscope {meta.get('flawscope_version')} in ONNX "
                f"format {header.format_version}; this flawscope ({__version__}) reads up to "
                f"{ONNX_FORMAT_VERSION}; upgrade flawscope"
            )
        try:
            self.pixel_threshold_info = check_pixel_threshold(header.pixel_threshold)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{self.path}: {exc}") from None
        check_graph_input(self.path, self.session, header.channels, header.input_size)
        self.model_name = header.model
        self._input_size = header.input_size
        self._channels = header.channels
        self.threshold = header.threshold
        self.normalization = header.normalization
        self.info = header.info
        self.map_scale = header.map_scale
        self.onnx_metadata = dict(meta)
        #: the graph's fixed batch size (None: dynamic); batches are cut to it and padded
        self.fixed_batch = graph_batch_size_of_session(self.session)
        self.batch_size = self.fixed_batch or batch_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self._input_size  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return self._channels

    def score(
        self, images: ImageInput, with_maps: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image scores and (optionally) anomaly maps, as :meth:`Detector.score`."""
        scores, maps = [], []
        wanted = ["score", "anomaly_map"] if with_maps else ["score"]
        for batch, _ in iter_batches(images, self.input_size, self.channels, self.batch_size):
            n = len(batch)
            if self.fixed_batch is not None and n < self.fixed_batch:
                pad = np.repeat(batch[-1:], self.fixed_batch - n, axis=0)
                batch = np.concatenate([batch, pad])
            out = self.session.run(wanted, {INPUT_NAME: batch})
            scores.append(out[0][:n])
            if with_maps:
                maps.append(out[1][:n])
        h, w = self.input_size
        s = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        if not with_maps:
            return s, None
        return s, (np.concatenate(maps) if maps else np.zeros((0, h, w), np.float32))

    def decision_function(self, images: ImageInput) -> np.ndarray:
        return self.score(images, with_maps=False)[0]

    def _scorer(self) -> OnnxInspector:
        return self


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


def _is_classifier_file(path: str | os.PathLike) -> bool:
    """True for a class + state classifier model file or its ONNX export (never raises)."""
    try:
        if is_onnx_file(path):
            meta = onnx_session(str(path), "cpu", 1).get_modelmeta().custom_metadata_map
            return meta.get("kind") == "classifier"
        from flawscope.modelfile import read_metadata

        return read_metadata(Path(path)).get("kind") == "classifier"
    except Exception:
        return False


def load_any_model(
    path: str | os.PathLike, device: str = "auto", *, allow_legacy: bool | None = None,
    runtime: str = "auto", prepare_missing: bool = False, threads: int | None = None,
) -> Inspector | OnnxInspector:
    """A flawscope model file (safetensors) as :class:`Inspector`, an exported ``.onnx`` as
    :class:`OnnxInspector`, by file content. A classifier file raises
    :class:`ModelFileError` pointing to ``flawscope classify predict``. ``allow_legacy``: as
    :meth:`Inspector.load`. ``runtime``, ``prepare_missing``, ``threads``: which runtime
    scores a model file (:func:`flawscope.fastruntime.select_runtime`; default: its cached
    onnxruntime graph when there is one)."""
    from flawscope.fastruntime import select_runtime

    try:
        if Path(path).is_file() and is_onnx_file(path):
            if runtime == "torch":
                raise ConfigError(f"--runtime torch: {path} is an ONNX export, which runs in "
                                  "onnxruntime; give the model file to run it in PyTorch")
            return OnnxInspector(path, device=device, threads=threads)
        inspector = Inspector.load(path, device=device, allow_legacy=allow_legacy)
    except ModelFileError:
        if Path(path).is_file() and _is_classifier_file(path):
            raise ModelFileError(
                f"{path}: is a class + state classifier, not an anomaly detector: use "
                f"`flawscope classify predict {path} IMAGES` (or `flawscope serve DETECTOR "
                f"--classifier {path}`)") from None
        raise
    return select_runtime(inspector, path, runtime, prepare_missing=prepare_missing,
                          threads=threads)
