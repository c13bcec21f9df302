"""Classifier ONNX export with a parity check, and :class:`OnnxClassifier` to run it.

The exported graph takes raw pixels, ``uint8 N x 3 x H x W`` at the model's input size
(resizing stays outside, done by :func:`flawscope.data.images.load_images` on both paths),
normalises them with the training mean / std, runs every fold network and returns
``probabilities`` (float32 ``N x labels``, the mean of the folds' softmax). The batch axis is
dynamic. The labels, their object classes, input size, normalisation, augmentation policy
(for ``--tta flips`` and its no-flip classes), backbone, out-of-fold metrics and flawscope
version are in the ONNX ``metadata_props``, so the file is self-contained.

:func:`export_classifier_onnx` refuses to write a file whose probabilities differ from the
PyTorch ensemble by more than :data:`PROBA_TOL` (absolute) or that names another label for any
check image whose top two probabilities are further apart than that.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flawscope import __version__
from flawscope.classify.model import Classifier, ClassifierPredictions, Normalizer
from flawscope.classify.tta import tta_proba
from flawscope.data.source import ImageInput, iter_batches
from flawscope.errors import ConfigError, FlawscopeError, ModelFileError
from flawscope.io import atomic_write_bytes
from flawscope.runtime import check_graph_input, onnx_session, open_onnx_file
from flawscope.schema import SchemaError, classifier_header_from_onnx

log = logging.getLogger(__name__)

ONNX_FORMAT = "flawscope-onnx-classifier"
ONNX_FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
#: parity tolerance on probabilities (absolute)
PROBA_TOL = 1e-4


class ClassifierExportError(FlawscopeError):
    """The classifier cannot be exported, or the graph disagrees with PyTorch."""


class ClassifierGraph(nn.Module):
    """uint8 pixels -> normalisation -> every fold -> mean of the softmax."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        cfg = classifier.config
        self.normalizer = Normalizer(cfg["mean"], cfg["std"])
        self.nets = nn.ModuleList(net.cpu().eval() for net in classifier.nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalizer(x)
        probs = [net(x).float().softmax(dim=1) for net in self.nets]
        return torch.stack(probs).mean(0)


@dataclass
class ClassifierParity:
    """Largest deviation between onnxruntime and torch over the check images."""

    images: int
    max_abs_proba: float
    label_mismatches: int

    def ok(self) -> bool:
        return self.max_abs_proba <= PROBA_TOL and self.label_mismatches == 0

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "max_abs_proba": self.max_abs_proba,
                "label_mismatches": self.label_mismatches}


def onnx_metadata(classifier: Classifier) -> dict[str, str]:
    cfg = classifier.config
    h, w = classifier.image_size
    return {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "kind": "classifier",
        "flawscope_version": __version__,
        "labels": json.dumps(classifier.labels),
        "label_classes": json.dumps(cfg.get("label_classes") or {}),
        "image_size": json.dumps([h, w]),
        "channels": "3",
        "input": f"{INPUT_NAME}: uint8 N x 3 x {h} x {w} (RGB, already resized)",
        "output": f"{OUTPUT_NAME}: float32 N x {len(classifier.labels)} (mean of the folds' "
                  "softmax)",
        "mean": json.dumps(cfg["mean"]),
        "std": json.dumps(cfg["std"]),
        "augment": json.dumps(cfg.get("augment") or {}),
        "tta": str(cfg.get("tta") or "none"),
        "backbone": classifier.backbone,
        "fold_count": str(len(classifier.nets)),
        "oof": json.dumps(cfg.get("oof") or {}),
        **({"two_stage": json.dumps(cfg["two_stage"])} if cfg.get("two_stage") else {}),
    }


def _check_batches(size: tuple[int, int], images: ImageInput | None) -> list[np.ndarray]:
    h, w = size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (2, 3, h // 4 + 1, w // 4 + 1)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(base), size=(h, w),
                                             mode="bilinear", align_corners=False)
    batches = [
        rng.integers(0, 256, (3, 3, h, w), dtype=np.uint8),
        np.full((1, 3, h, w), 128, np.uint8),
        smooth.round().clamp(0, 255).to(torch.uint8).numpy(),
    ]
    if images is not None and len(images):
        batches += [b for b, _ in iter_batches(images, size, 3, 8)]
    return batches


def check_parity(session: Any, graph: ClassifierGraph,
                 batches: Sequence[np.ndarray]) -> ClassifierParity:
    """Run torch and onnxruntime on every batch and measure the deviation."""
    worst, mismatches, n = 0.0, 0, 0
    for batch in batches:
        with torch.inference_mode():
            ref = graph(torch.from_numpy(batch)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max(initial=0.0)))
        top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
        clear = (top2[:, 1] - top2[:, 0]) > PROBA_TOL
        mismatches += int(((got.argmax(1) != ref.argmax(1)) & clear).sum())
        n += len(batch)
    return ClassifierParity(n, worst, mismatches)


def _to_proto(graph: ClassifierGraph, size: tuple[int, int], opset: int) -> Any:
    """The legacy (TorchScript) exporter with a dynamic batch axis."""
    import warnings

    import onnx

    example = torch.zeros((2, 3, *size), dtype=torch.uint8)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), buf, dynamo=False, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return onnx.load_model_from_string(buf.getvalue())


def export_classifier_onnx(
    model: Classifier | str | os.PathLike,
    output: str | os.PathLike,
    *,
    opset: int = 17,
    check_images: ImageInput | None = None,
) -> tuple[Path, ClassifierParity]:
    """Export a classifier model file (or :class:`Classifier`) to ``output`` (ONNX).

    ``check_images``: real images added to the parity check. Raises
    :class:`ClassifierExportError` and writes nothing when onnxruntime disagrees with PyTorch.
    """
    try:
        import onnx
    except ImportError:
        raise ConfigError("onnx is not installed: pip install 'flawscope[export]'") from None
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"-o {output}: is a folder; give an .onnx file name")
    where = str(model) if not isinstance(model, Classifier) else "classifier"
    clf = model if isinstance(model, Classifier) else Classifier.load(model, device="cpu")
    graph = ClassifierGraph(clf).eval()
    size = clf.image_size
    try:
        proto = _to_proto(graph, size, opset)
    except Exception as exc:  # exporter failures come in many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClassifierExportError(f"{where}: ONNX export failed: {first}") from None
    del proto.metadata_props[:]
    for key, value in onnx_metadata(clf).items():
        proto.metadata_props.add(key=key, value=value)
    report = check_parity(onnx_session(proto.SerializeToString()), graph,
                          _check_batches(size, check_images))
    if not report.ok():
        raise ClassifierExportError(
            f"{output}: not written: onnxruntime disagrees with PyTorch (max probability "
            f"deviation {report.max_abs_proba:.3g}, {report.label_mismatches} different "
            f"label(s); tolerance {PROBA_TOL:g})"
        )
    proto.metadata_props.add(key="parity", value=json.dumps(report.to_dict()))
    onnx.checker.check_model(proto)
    atomic_write_bytes(output, proto.SerializeToString())
    log.info("classifier exported to %s (max probability deviation %.2g)", output,
             report.max_abs_proba)
    return output, report


class OnnxClassifier(ClassifierPredictions):
    """An exported classifier run by onnxruntime, with the interface of :class:`Classifier`:
    ``labels``, ``image_size``, ``config``, :meth:`predict_proba`, :meth:`predict` (label
    names) and :meth:`classify` (``{"label", "class", "state", "probability"}`` per image)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such file")
        self.session, meta = open_onnx_file(self.path, "cpu", threads, "file")
        if meta.get("format") != ONNX_FORMAT:
            raise ModelFileError(
                f"{self.path}: not a flawscope classifier export (metadata format "
                f"{meta.get('format')!r}; expected {ONNX_FORMAT!r})"
            )
        try:  # the same checks and limits as a model file's header, before any image
            version, header = classifier_header_from_onnx(meta)
        except SchemaError as exc:
            raise ModelFileError(f"{self.path}: {exc}") from None
        if version > ONNX_FORMAT_VERSION:
            raise ModelFileError(
                f"{self.path}: written by flawscope {meta.get('flawscope_version')} in ONNX "
                f"format {version}; this flawscope ({__version__}) reads up to "
                f"{ONNX_FORMAT_VERSION}; upgrade flawscope")
        check_graph_input(self.path, self.session, 3, header.image_size)
        try:
            self.config: dict[str, Any] = {
                "labels": header.labels,
                "label_classes": json.loads(meta.get("label_classes", "{}")),
                "image_size": list(header.image_size),
                "augment": json.loads(meta.get("augment", "{}")),
                "tta": meta.get("tta", "none"),
                "backbone": meta.get("backbone", "?"),
                "oof": json.loads(meta.get("oof", "{}")),
                **({"two_stage": json.loads(meta["two_stage"])} if "two_stage" in meta else {}),
                "metadata": dict(meta),
            }
        except (KeyError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{self.path}: damaged metadata field {exc}") from None
        self._tta_where = str(self.path)

    def describe(self) -> str:
        h, w = self.image_size
        return f"ONNX classifier ({self.config['backbone']}), {len(self.labels)} labels, " \
               f"{h}x{w} px"

    def proba_from_uint8(self, batch: np.ndarray, tta: str | None = None) -> np.ndarray:
        def run(x: np.ndarray) -> np.ndarray:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        return tta_proba(run, batch, tta, self.config).astype(np.float32)


def load_classifier(
    path: str | os.PathLike, device: str = "auto", *, allow_legacy: bool | None = None
) -> Classifier | OnnxClassifier:
    """A classifier model file or its ONNX export (by the ``.onnx`` suffix); ``allow_legacy``:
    as :meth:`Classifier.load`."""
    if str(path).lower().endswith(".onnx"):
        return OnnxClassifier(path)
    return Classifier.load(path, device=device, allow_legacy=allow_legacy)
