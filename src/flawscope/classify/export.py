"""Classifier ONNX export (on the detectors' stack, :mod:`flawscope.export` and
:mod:`flawscope.onnxformat`) and :class:`OnnxClassifier` to run it.

The exported graph takes raw pixels, ``uint8 N x 3 x H x W`` at the model's input size
(resizing stays outside, done by :func:`flawscope.data.images.load_images` on both paths),
normalises them with the training mean / std, runs every fold network and returns
``probabilities`` (float32 ``N x labels``, the mean of the folds' softmax). The batch axis is
dynamic. Beside the shared fields (format, version, kind, input size, channels, exporter,
parity), the labels, their object classes, normalisation, augmentation policy (for ``--tta
flips`` and its no-flip classes), backbone and out-of-fold metrics are in the ONNX
``metadata_props``, so the file is self-contained.

:func:`export_classifier_onnx` refuses to write a file whose probabilities differ from the
PyTorch ensemble by more than :data:`PROBA_TOL` (absolute) or that names another label for any
check image whose top two probabilities are further apart than that
(:func:`flawscope.export.check_parity`, the detectors' check).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flawscope.classify.model import Classifier, ClassifierPredictions, Normalizer
from flawscope.classify.tta import tta_proba
from flawscope.data.source import ImageInput
from flawscope.errors import ConfigError, FlawscopeError
from flawscope.export import (
    ParityReport,
    check_batches,
    check_parity,
    quiet_exporter,
    require_onnx,
    to_proto,
    write_export,
)
from flawscope.onnxformat import (
    CLASSIFIER_OUTPUTS,
    INPUT_NAME,
    base_metadata,
    is_onnx_file,
    onnx_session,
    open_export,
)

log = logging.getLogger(__name__)

OUTPUT_NAME = CLASSIFIER_OUTPUTS[0]
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


def onnx_metadata(classifier: Classifier) -> dict[str, str]:
    """A classifier export's ``metadata_props`` (shared fields plus the classifier's own)."""
    cfg = classifier.config
    h, w = classifier.image_size
    return {
        **base_metadata("classifier", (h, w), 3, "torchscript"),
        "labels": json.dumps(classifier.labels),
        "label_classes": json.dumps(cfg.get("label_classes") or {}),
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


def label_mismatches(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> int:
    """Top labels that differ where PyTorch's top two probabilities are clearly apart."""
    p_ref, p_got = np.asarray(ref[0]), np.asarray(got[0])
    if p_ref.shape[1] < 2:
        return 0
    top2 = np.sort(p_ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > PROBA_TOL
    return int(((p_got.argmax(1) != p_ref.argmax(1)) & clear).sum())


def export_classifier_onnx(
    model: Classifier | str | os.PathLike,
    output: str | os.PathLike,
    *,
    opset: int = 17,
    check_images: ImageInput | None = None,
) -> tuple[Path, ParityReport]:
    """Export a classifier model file (or :class:`Classifier`) to ``output`` (ONNX).

    ``check_images``: real images added to the parity check. Raises
    :class:`ClassifierExportError` and writes nothing when onnxruntime disagrees with PyTorch.
    """
    require_onnx()
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"-o {output}: is a folder; give an .onnx file name")
    where = str(model) if not isinstance(model, Classifier) else "classifier"
    clf = model if isinstance(model, Classifier) else Classifier.load(model, device="cpu")
    graph = ClassifierGraph(clf).eval()
    size = clf.image_size
    try:
        with quiet_exporter():
            proto = to_proto(graph, torch.zeros((2, 3, *size), dtype=torch.uint8),
                             "torchscript", opset, dynamic=True, outputs=CLASSIFIER_OUTPUTS)
    except Exception as exc:  # exporter failures come in many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClassifierExportError(f"{where}: ONNX export failed: {first}") from None
    report = check_parity(onnx_session(proto.SerializeToString()), graph,
                          check_batches(3, size, check_images), outputs=CLASSIFIER_OUTPUTS,
                          map_output=None, mismatches=label_mismatches, tolerance=PROBA_TOL)
    if not report.ok():
        raise ClassifierExportError(
            f"{output}: not written: onnxruntime disagrees with PyTorch ({report.describe()})")
    write_export(proto, onnx_metadata(clf), report, output)
    log.info("classifier exported to %s (max probability deviation %.2g)", output,
             report.max_abs)
    return output, report


class OnnxClassifier(ClassifierPredictions):
    """An exported classifier run by onnxruntime, with the interface of :class:`Classifier`:
    ``labels``, ``image_size``, ``config``, :meth:`predict_proba`, :meth:`predict` (label
    names) and :meth:`classify` (``{"label", "class", "state", "probability"}`` per image)."""

    def __init__(self, path: str | os.PathLike, device: str = "auto",
                 threads: int | None = None) -> None:
        self.path = Path(path)
        self.session, header, meta = open_export(self.path, "classifier", device=device,
                                                 threads=threads)
        self.config: dict[str, Any] = {**header.config, "metadata": meta}
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
    """A classifier model file or its ONNX export (by content, as detectors); ``allow_legacy``:
    as :meth:`Classifier.load`."""
    if Path(path).is_file() and is_onnx_file(path):
        return OnnxClassifier(path, device=device)
    return Classifier.load(path, device=device, allow_legacy=allow_legacy)
