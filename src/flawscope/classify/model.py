"""The trained classifier: a fold ensemble (mean of the folds' softmax) in one model file.

The file is a flawscope model file (:mod:`flawscope.modelfile`, kind ``classifier``): one
safetensors file with every fold's weights under ``fold{k}.`` and a JSON configuration with
the labels, backbone, weight source, image size, normalisation (mean / std of the training
images), augmentation policy, per-fold results and out-of-fold metrics. Loading runs no code.
Inference networks are built without stochastic depth (``drop_path_rate=0``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from flawscope.classify.config import OUTPUT_STRIDES, POOLINGS, network_kwargs
from flawscope.classify.tta import check_tta, prediction_records, tta_proba
from flawscope.data.images import as_size
from flawscope.data.source import ImageInput, iter_batches
from flawscope.device import resolve_device
from flawscope.errors import ConfigError, ModelFileError
from flawscope.modelfile import read_model, save_model
from flawscope.schema import ClassifierHeader

KIND = "classifier"


def build_network(
    backbone: str, num_classes: int, drop_path_rate: float = 0.0, pooling: str = "avg",
    output_stride: int = 32,
) -> nn.Module:
    """The timm architecture (no pretrained weights: they come from the model file)."""
    if not timm.is_model(backbone):
        raise ModelFileError(f"backbone {backbone}: not a timm model in this timm version")
    if pooling not in POOLINGS:
        raise ModelFileError(f"pooling {pooling!r}: choose from {', '.join(POOLINGS)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ModelFileError(f"output_stride {output_stride!r}: choose from "
                             f"{', '.join(map(str, OUTPUT_STRIDES))}")
    return timm.create_model(
        backbone, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate,
        **network_kwargs(pooling, output_stride),
    )


class Normalizer(nn.Module):
    """uint8 ``N x C x H x W`` -> float, scaled to [0, 1] and standardised per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class ClassifierPredictions:
    """What :class:`Classifier` and the ONNX runtime's ``OnnxClassifier`` share: labels and
    size from ``config``, and predictions built on :meth:`proba_from_uint8`."""

    config: dict[str, Any]
    #: how error messages name the model (``check_tta``)
    _tta_where = "model"

    @property
    def labels(self) -> list[str]:
        return list(self.config["labels"])

    @property
    def image_size(self) -> tuple[int, int]:
        return as_size(self.config["image_size"])

    def proba_from_uint8(self, batch: np.ndarray, tta: str | None = None) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(
        self, images: ImageInput, batch_size: int = 64, tta: str | None = None
    ) -> np.ndarray:
        """Class probabilities ``N x len(labels)`` (float32) for image paths or a uint8 array
        ``N x C x H x W`` (resized to the model size when needed)."""
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size}: must be at least 1")
        check_tta(tta, self.config, self._tta_where)
        out = [self.proba_from_uint8(batch, tta)
               for batch, _ in iter_batches(images, self.image_size, 3, batch_size)]
        if not out:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def predict(
        self, images: ImageInput, batch_size: int = 64, tta: str | None = None
    ) -> list[str]:
        """Label names (argmax of the ensemble probabilities)."""
        proba = self.predict_proba(images, batch_size, tta)
        return [self.labels[i] for i in proba.argmax(axis=1)]

    def classify(
        self, images: ImageInput, batch_size: int = 64, tta: str | None = None
    ) -> list[dict[str, Any]]:
        """One ``{"label", "class", "state", "probability"}`` per image."""
        proba = self.predict_proba(images, batch_size, tta)
        return prediction_records(proba, self.labels, self.config.get("label_classes") or {})


class Classifier(ClassifierPredictions):
    """A fold ensemble of timm classifiers over a fixed label space.

    ``Classifier.load(path)`` reads a model file; :meth:`predict_proba` averages the folds'
    softmax; :meth:`predict` returns label names, :meth:`classify` records (label, class,
    state, probability). ``config`` is the JSON configuration stored in
    the file (``labels``, ``backbone``, ``image_size``, ``mean``, ``std``, ``weight_source``,
    ``augment``, ``folds``, ``oof`` ...).
    """

    def __init__(
        self,
        config: dict[str, Any],
        fold_states: Sequence[dict[str, torch.Tensor]],
        device: str | torch.device = "auto",
    ) -> None:
        if not fold_states:
            raise ModelFileError("classifier: no fold weights")
        self.config = config
        self.device = resolve_device(device)
        self.normalizer = Normalizer(config["mean"], config["std"]).to(self.device)
        self.nets: list[nn.Module] = []
        for k, sd in enumerate(fold_states):
            net = build_network(config["backbone"], len(self.labels),
                                pooling=config.get("pooling", "avg"),
                                output_stride=int(config.get("output_stride", 32)))
            try:
                net.load_state_dict(sd)
            except RuntimeError as exc:
                first = str(exc).splitlines()[0]
                raise ModelFileError(
                    f"classifier fold {k}: weights do not fit backbone {config['backbone']} "
                    f"({first})"
                ) from None
            self.nets.append(net.to(self.device).eval())

    # ------------------------------------------------------------------ properties
    @property
    def backbone(self) -> str:
        return str(self.config["backbone"])

    def describe(self) -> str:
        ws = self.config.get("weight_source", {})
        oof = self.config.get("oof") or {}
        f1 = f", OOF macro F1 {oof['macro_f1']:.4f}" if oof.get("macro_f1") is not None else ""
        return (
            f"{self.backbone} ({ws.get('kind', '?')} weights), {len(self.nets)} fold(s), "
            f"{len(self.labels)} labels, {self.image_size[0]}x{self.image_size[1]} px{f1}"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        tensors = {
            f"fold{k}.{name}": t for k, net in enumerate(self.nets)
            for name, t in net.state_dict().items()
        }
        return save_model(path, KIND, self.config, tensors)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "auto", *,
        allow_legacy: bool | None = None,
    ) -> Classifier:
        """``allow_legacy``: accept a format-1 file (see :func:`flawscope.modelfile.read_model`)."""
        loaded = read_model(path, kind=KIND, allow_legacy=allow_legacy)
        header: ClassifierHeader = loaded.header
        config, tensors, n = header.config, loaded.tensors, header.fold_count
        states: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
        for key, t in tensors.items():
            head, _, rest = key.partition(".")
            k = int(head[4:]) if head.startswith("fold") and head[4:].isdigit() else -1
            if not 0 <= k < n:
                raise ModelFileError(f"{path}: unexpected tensor {key} (model has {n} folds)")
            states[k][rest] = t
        if n == 0 or any(not s for s in states):
            raise ModelFileError(f"{path}: fold weights missing (expected {n} folds)")
        try:
            return cls(config, states, device)
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict_proba_from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch at the model size -> mean of the folds' softmax (``N x labels``)."""
        x = self.normalizer(x.to(self.device))
        probs = torch.stack([net(x).float().softmax(dim=1) for net in self.nets])
        return probs.mean(0)

    def proba_from_uint8(self, batch: np.ndarray, tta: str | None = None) -> np.ndarray:
        """uint8 ``N x 3 x H x W`` at the model size -> probabilities (float32), with
        test-time augmentation ``tta`` (:mod:`flawscope.classify.tta`)."""

        def run(x: np.ndarray) -> np.ndarray:
            return self.predict_proba_from_pixels(torch.from_numpy(x)).cpu().numpy()

        return tta_proba(run, np.asarray(batch), tta, self.config).astype(np.float32)

    def throughput(self, images: np.ndarray, batch_size: int = 64) -> float:
        """Images per second of :meth:`predict_proba` on decoded images (no file decoding)."""
        t0 = time.perf_counter()
        self.predict_proba(images, batch_size)
        return len(images) / max(time.perf_counter() - t0, 1e-9)
