"""Running any flawscope model file: the PyTorch :class:`~flawscope.pipeline.Inspector` or an
exported ``.onnx`` (:class:`OnnxInspector`, onnxruntime), behind one API.

This is what ``predict``, ``evaluate`` and the service use; it does not need the exporter
(:mod:`flawscope.export` writes the ``.onnx`` files this module reads; their format, metadata
schema and the names of inputs and outputs are defined in :mod:`flawscope.onnxformat`, shared
with the classifier's export).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flawscope.data.source import ImageInput, iter_batches
from flawscope.errors import ConfigError, ModelFileError
from flawscope.onnxformat import (
    DETECTOR_OUTPUTS,
    FORMAT_VERSION,
    FORMATS,
    INPUT_NAME,
    check_graph_input,
    graph_batch_size_of_session,
    is_onnx_file,
    onnx_kind,
    onnx_session,
    open_export,
)
from flawscope.pipeline import Inspector, Prediction, Verdicts, map_scale
from flawscope.regions import RegionRule
from flawscope.threshold import ScoreNormalization, Threshold

ONNX_FORMAT = FORMATS["detector"]
ONNX_FORMAT_VERSION = FORMAT_VERSION
OUTPUT_NAMES = DETECTOR_OUTPUTS
#: images per onnxruntime call: 8 was the fastest and takes less memory than 16 (PatchCore,
#: 320 px, 2 cores, `flawscope predict` peak RSS: pill 1598 MB / 7.3 s at 8 vs 1988 MB /
#: 8.2 s at 16, bottle 1590 / 4.0 s vs 1967 / 4.2 s; PyTorch at its 16: 1709 MB / 17.4 s)
DEFAULT_ONNX_BATCH = 8
__all__ = ["ONNX_FORMAT", "ONNX_FORMAT_VERSION", "OUTPUT_NAMES", "INPUT_NAME", "InspectorLike",
           "OnnxInspector", "check_graph_input", "is_onnx_file", "load_any_model", "map_scale",
           "onnx_session", "graph_batch_size_of_session"]


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
        self.session, header, meta = open_export(self.path, "detector", device=device,
                                                 threads=threads)
        self.pixel_threshold_info = header.pixel_threshold
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


def is_classifier_file(path: str | os.PathLike) -> bool:
    """True for a class + state classifier model file or its ONNX export (never raises)."""
    if is_onnx_file(path):
        return onnx_kind(path) == "classifier"
    try:
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
        if Path(path).is_file() and is_classifier_file(path):
            raise ModelFileError(
                f"{path}: is a class + state classifier, not an anomaly detector: use "
                f"`flawscope classify predict {path} IMAGES` (or `flawscope serve DETECTOR "
                f"--classifier {path}`)") from None
        raise
    return select_runtime(inspector, path, runtime, prepare_missing=prepare_missing,
                          threads=threads)
