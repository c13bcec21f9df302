"""ONNX export with score parity (:class:`~flawscope.runtime.OnnxInspector` runs the file).

The exported graph takes raw pixels, ``uint8 N x C x H x W`` already resized to the model's
input size (resizing is the one step left outside, done by :func:`flawscope.data.images.
read_image` on both paths), and returns

``score``             float32 ``N``: the raw image score (higher = more abnormal);
``normalized_score``  float32 ``N``: the score mapped to [0, 1], threshold at 0.5;
``anomaly_map``       float32 ``N x H x W``;
``is_defect``         bool ``N``: ``score > threshold``.

The batch axis is dynamic (if a model's code depends on the batch size, so that no exporter
gives a dynamic graph that passes the parity check, the last resort is a graph with a fixed
batch size of 1, recorded as ``batch`` in the metadata; :class:`OnnxInspector` handles both).
The threshold (value and rule), the score normalisation, the input
size, channels, model name, training summary and flawscope version are stored in the ONNX
``metadata_props``, so the file is self-contained. The ``is_defect`` comparison uses the
threshold rounded *down* to float32, which decides exactly like ``score > threshold`` in float64
for every float32 score.

:func:`export_onnx` refuses to write a file whose outputs deviate from the PyTorch model: it
runs onnxruntime and torch on noise, flat and (optionally) real images at several batch sizes
and compares scores (``|d| <= 1e-4 * max(1, |score|)``) and maps before the atomic write.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flawscope.data.source import ImageInput, iter_batches
from flawscope.errors import ConfigError, FlawscopeError
from flawscope.io import atomic_write_bytes
from flawscope.onnxformat import (
    DETECTOR_OUTPUTS,
    INPUT_NAME,
    base_metadata,
    graph_batch_size_of_session,
    onnx_session,
)
from flawscope.pipeline import Inspector, map_scale
from flawscope.threshold import ScoreNormalization

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript", "quick")
#: (exporter, dynamic batch) tried in order; a fixed batch size of 1 is the last resort.
#: ``quick`` (the cached graph of :mod:`flawscope.fastruntime`, written after every fit): the
#: TorchScript tracer first, 6 s instead of dynamo's 38 s for a PatchCore graph (pill, 2
#: cores), its graph about 10-20 % slower in onnxruntime (24-25 vs 27-30 img/s)
_ATTEMPTS = {
    "auto": [("dynamo", True), ("torchscript", True), ("dynamo", False)],
    "quick": [("torchscript", True), ("dynamo", True), ("dynamo", False)],
    "dynamo": [("dynamo", True), ("dynamo", False)],
    "torchscript": [("torchscript", True), ("torchscript", False)],
}
#: parity tolerance: |score_onnx - score_torch| <= SCORE_TOL * max(1, |score_torch|)
SCORE_TOL = 1e-4
_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export",
                  "torch._dynamo", "torch.fx")


class ExportError(FlawscopeError):
    """The model cannot be exported, or the exported graph disagrees with PyTorch."""


def require_onnx() -> None:
    """The exporters need the ``onnx`` package (the ``export`` extra)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("onnx is not installed: pip install 'flawscope[export]'") from None


# ---------------------------------------------------------------------------- graph
def threshold_float32(value: float) -> np.float32:
    """The largest float32 <= ``value``: ``s > it`` equals ``s > value`` for float32 ``s``."""
    t = np.float32(value)
    if float(t) > value:
        t = np.nextafter(t, np.float32(-np.inf), dtype=np.float32)
    return t


class ExportModule(nn.Module):
    """A detector's inference module plus score normalisation and the verdict."""

    def __init__(
        self, core: nn.Module, threshold: float, normalization: ScoreNormalization
    ) -> None:
        super().__init__()
        self.core = core
        span = max(normalization.threshold - normalization.low, 1e-12)
        self.register_buffer("threshold", torch.tensor(threshold_float32(threshold)))
        self.register_buffer("norm_threshold", torch.tensor(normalization.threshold,
                                                            dtype=torch.float32))
        self.register_buffer("norm_half_slope", torch.tensor(0.5 / span, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        score, amap = self.core(image)
        score = score.float()
        normalized = ((score - self.norm_threshold) * self.norm_half_slope + 0.5).clamp(0.0, 1.0)
        return score, normalized, amap.float(), score > self.threshold


def build_export_module(inspector: Inspector) -> ExportModule:
    """The module that is exported: on CPU, in eval mode, detached from the live detector."""
    core = copy.deepcopy(inspector.detector.inference_module()).cpu().eval()
    return ExportModule(core, inspector.threshold.value, inspector.normalization).eval()


def onnx_metadata(inspector: Inspector, exporter: str) -> dict[str, str]:
    """A detector export's ``metadata_props`` (:mod:`flawscope.onnxformat`'s shared fields
    plus the detector's own; all values are strings)."""
    h, w = inspector.input_size
    return {
        **base_metadata("detector", (h, w), inspector.channels, exporter),
        "model": inspector.detector.model_name,
        "input": f"{INPUT_NAME}: uint8 N x {inspector.channels} x {h} x {w} "
                 f"({'gray' if inspector.channels == 1 else 'RGB'}), resized to {h}x{w}",
        "outputs": ", ".join(DETECTOR_OUTPUTS),
        "threshold": json.dumps(inspector.threshold.to_dict()),
        "threshold_value": repr(float(inspector.threshold.value)),
        "threshold_rule": inspector.threshold.rule,
        "normalization": json.dumps(inspector.normalization.to_dict()),
        # defect regions: calibrated pixel threshold ("null": the image threshold is used)
        "pixel_threshold": json.dumps(inspector.pixel_threshold_info),
        "map_scale": map_scale(inspector.detector),
        "info": json.dumps(inspector.info, default=str),
    }


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporters' progress prints and warnings (kept for error messages)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), \
                contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_proto(
    module: nn.Module, example: torch.Tensor, exporter: str, opset: int | None, dynamic: bool,
    outputs: Sequence[str] = DETECTOR_OUTPUTS,
):
    """torch -> ``onnx.ModelProto`` with the named inputs/``outputs``; ``dynamic``: batch
    axis."""
    import onnx

    if exporter == "dynamo":
        shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic else None
        program = torch.onnx.export(
            module, (example,), None, dynamo=True, input_names=[INPUT_NAME],
            output_names=list(outputs), dynamic_shapes=shapes,
            opset_version=opset, external_data=False, verbose=False,
        )
        return program.model_proto
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)} if dynamic else None
    torch.onnx.export(
        module, (example,), buf, dynamo=False, input_names=[INPUT_NAME],
        output_names=list(outputs), dynamic_axes=axes, opset_version=opset or 17,
    )
    return onnx.load_model_from_string(buf.getvalue())


def graph_batch_size(proto: Any) -> int | None:
    """The fixed batch size of the graph input, or None when the batch axis is dynamic."""
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return None if dim.dim_param or not dim.dim_value else int(dim.dim_value)


# ---------------------------------------------------------------------------- parity
@dataclass
class ParityReport:
    """Largest deviations between onnxruntime and torch over the check inputs, for either
    kind of export: the primary output is a detector's score or a classifier's probabilities,
    the map a detector's anomaly map (0 for a classifier), ``mismatches`` the decisions that
    differ (a detector's verdicts; a classifier's top label where its top two probabilities
    are further apart than the tolerance)."""

    images: int
    max_abs: float
    max_rel: float
    max_abs_map: float
    mismatches: int
    tolerance: float = SCORE_TOL

    def ok(self) -> bool:
        return self.max_rel <= self.tolerance and self.max_abs_map <= self.tolerance and \
            self.mismatches == 0

    def describe(self) -> str:
        return (f"max relative deviation {self.max_rel:.3g}, map {self.max_abs_map:.3g}, "
                f"{self.mismatches} different decision(s); tolerance {self.tolerance:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "max_abs_map": self.max_abs_map, "mismatches": self.mismatches,
                "tolerance": self.tolerance}


def check_batches(
    channels: int, size: tuple[int, int], check_images: ImageInput | None
) -> list[np.ndarray]:
    """Batches for a parity check: noise, flat gray, smooth random structure (closer to real
    parts than white noise) and the real ``check_images``, in batch sizes from 1 to 17."""
    h, w = size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (2, channels, h // 4 + 1, w // 4 + 1)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(base), size=(h, w),
                                             mode="bilinear", align_corners=False)
    batches = [
        rng.integers(0, 256, (3, channels, h, w), dtype=np.uint8),
        np.full((1, channels, h, w), 128, np.uint8),
        # larger than the export example: catches loops unrolled for the example's batch
        rng.integers(0, 256, (17, channels, h, w), dtype=np.uint8),
        smooth.round().clamp(0, 255).to(torch.uint8).numpy(),
    ]
    if check_images is not None and len(check_images):
        batches += [batch for batch, _ in iter_batches(check_images, size, channels, 8)]
    return batches


def torch_reference(module: nn.Module, batch: np.ndarray) -> list[np.ndarray]:
    """The PyTorch module's outputs on ``batch`` (one array per output)."""
    with torch.inference_mode():
        out = module(torch.from_numpy(batch))
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def verdict_mismatches(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> int:
    """Detector exports: verdicts (output 3) that differ."""
    return int((np.asarray(got[3]) != np.asarray(ref[3])).sum())


def check_parity(
    session: Any, module: nn.Module, batches: Sequence[np.ndarray], *,
    outputs: Sequence[str] = DETECTOR_OUTPUTS, map_output: int | None = 2,
    mismatches: Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], int] = verdict_mismatches,
    tolerance: float = SCORE_TOL,
) -> ParityReport:
    """Run torch (``module``) and onnxruntime on every batch and measure the deviations of
    output 0 (relative to ``max(1, |torch|)``), of output ``map_output`` (relative to the
    batch's largest value) and the decisions that ``mismatches`` counts."""
    abs_s = rel_s = abs_m = 0.0
    wrong = n = 0
    fixed = graph_batch_size_of_session(session)
    if fixed is not None:  # a graph with a fixed batch size gets batches of that size
        batches = [b[i : i + fixed] for b in batches for i in range(0, len(b) - fixed + 1, fixed)]
    for batch in batches:
        ref = torch_reference(module, batch)
        got = session.run(list(outputs), {INPUT_NAME: batch})
        d = np.abs(got[0].astype(np.float64) - ref[0].astype(np.float64))
        abs_s = max(abs_s, float(d.max(initial=0)))
        rel_s = max(rel_s, float((d / np.maximum(1.0, np.abs(ref[0]))).max(initial=0)))
        if map_output is not None:
            scale = max(1.0, float(np.abs(ref[map_output]).max(initial=0)))
            abs_m = max(abs_m, float(np.abs(got[map_output] - ref[map_output]).max(initial=0))
                        / scale)
        wrong += mismatches(got, ref)
        n += len(batch)
    return ParityReport(n, abs_s, rel_s, abs_m, wrong, tolerance)


def write_export(proto: Any, metadata: dict[str, str], report: ParityReport,
                 output: Path) -> None:
    """Write ``proto`` with ``metadata`` and its parity ``report`` to ``output`` after the
    ONNX checker passes (atomically: temp file + rename)."""
    import onnx

    del proto.metadata_props[:]
    for key, value in {**metadata, "parity": json.dumps(report.to_dict())}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    atomic_write_bytes(output, proto.SerializeToString())


# ---------------------------------------------------------------------------- export
def export_onnx(
    inspector: Inspector | str | os.PathLike,
    output: str | os.PathLike,
    *,
    exporter: str = "auto",
    opset: int | None = None,
    check_images: ImageInput | None = None,
) -> tuple[Path, ParityReport]:
    """Export ``inspector`` (or a model file) to ONNX at ``output``, after a parity check.

    ``exporter``: ``"dynamo"`` (``torch.export`` + onnxscript), ``"torchscript"`` (the legacy
    tracer), ``"auto"`` (dynamo, falling back to the tracer if dynamo fails, disagrees or
    fixes the batch size; then dynamo with a fixed batch size of 1) or ``"quick"`` (the tracer
    first, then as ``auto``).
    ``check_images``: real images added to the parity check (paths or a uint8 array).
    Raises :class:`ExportError` and writes nothing when no exporter gives a graph within
    tolerance.
    """
    require_onnx()
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter {exporter!r}: choose from {', '.join(EXPORTERS)}")
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"-o {output}: is a folder; give an .onnx file name")
    if not isinstance(inspector, Inspector):
        inspector = Inspector.load(inspector, device="cpu")
    module = build_export_module(inspector)
    h, w = inspector.input_size
    rng = np.random.default_rng(1)
    batches = check_batches(inspector.channels, (h, w), check_images)
    failures: list[str] = []
    for name, dynamic in _ATTEMPTS[exporter]:
        example = torch.from_numpy(
            rng.integers(0, 256, (2 if dynamic else 1, inspector.channels, h, w), np.uint8))
        label = name if dynamic else f"{name} (fixed batch size 1)"
        t0 = time.perf_counter()
        try:
            with quiet_exporter() as out:
                proto = to_proto(module, example, name, opset, dynamic)
        except Exception as exc:  # exporter failures come in many types
            tail = " | ".join(out.getvalue().strip().splitlines()[-3:])
            first = str(exc).splitlines()[0] if str(exc) else ""
            failures.append(f"{label} exporter failed: {type(exc).__name__}: {first} {tail}"
                            .strip())
            continue
        fixed = graph_batch_size(proto)
        if dynamic and fixed is not None:
            failures.append(f"{label} exporter fixed the batch size at {fixed} (the model's "
                            "code depends on the batch size)")
            continue
        meta = onnx_metadata(inspector, name)
        meta["batch"] = "dynamic" if fixed is None else str(fixed)
        try:
            report = check_parity(onnx_session(proto.SerializeToString()), module, batches)
        except Exception as exc:
            failures.append(f"{label} export does not run in onnxruntime: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        if not report.ok():
            failures.append(f"{label} export disagrees with PyTorch ({report.describe()})")
            continue
        write_export(proto, meta, report, output)
        if failures:
            log.warning("exported with the %s exporter after: %s", label, "; ".join(failures))
        log.info("exported %s with the %s exporter in %.1f s (max score deviation %.2g)",
                 output, label, time.perf_counter() - t0, report.max_abs)
        return output, report
    raise ExportError(f"{output}: not written: " + "; ".join(failures))


