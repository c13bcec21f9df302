"""PaDiM: a Gaussian per patch position over pretrained features, Mahalanobis distance.

As in Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization" (ICPR 2021): features of the chosen backbone stages, upsampled (nearest) to the
finest grid and concatenated; a seeded random subset of ``n_features`` channels; at every grid
position a multivariate Gaussian (mean and covariance of the training images' features there,
regularised by ``covariance_eps`` x I); the anomaly map is the Mahalanobis distance of each
patch to its position's Gaussian, upsampled bilinearly and Gaussian-smoothed; the image score
is the maximum of the map.

Training streams: per-position sums and outer-product sums are accumulated in float64, batch by
batch (around a shift taken from the first batch, so the covariance does not suffer
cancellation), so memory is ``positions x n_features^2 x 8`` bytes whatever the number of
training images. The inverse covariances are stored (float32). Inference is one batched
matrix product per batch in plain torch (:class:`PaDiMScorer`), exportable as it is.

Calibration: ``fit`` learns from every image and scores up to ``calibration_images`` of them
with the exact leave-one-out Gaussians (Sherman-Morrison, :meth:`PaDiM._holdout_scores`).

Benchmarks (defaults, every real dataset, against anomalib): README, "Detection quality";
Full table: README, "Benchmarks".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flawscope.backbones import DEFAULT_BACKBONE, FeatureExtractor
from flawscope.data.source import ImageInput, iter_batches
from flawscope.errors import ConfigError
from flawscope.models.features import (
    DEFAULT_CALIBRATION_IMAGES,
    FeatureDetector,
    PatchEmbedding,
)
from flawscope.models.registry import register
from flawscope.models.scoring import DEFAULT_TOPK_FRACTION, MapHead
from flawscope.training import progress_bar

#: PaDiM's own defaults, chosen on its own leave-one-dataset-out evidence
#: (docs/detection-quality.md, "PaDiM")
DEFAULT_PADIM_IMAGE_SIZE = 224  # 320 (PatchCore's): mean image AUROC 0.923 vs 0.932 at 224
DEFAULT_PADIM_SIGMA = 4.0
DEFAULT_PADIM_SCORE = "map-max"
DEFAULT_PADIM_POSITIONAL = "none"


class PaDiMScorer(nn.Module):
    """uint8 pixels -> (image score, anomaly map): PaDiM inference in plain torch."""

    def __init__(
        self,
        embedding: PatchEmbedding,
        mean: torch.Tensor,
        inv_covariance: torch.Tensor,
        head: MapHead,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.register_buffer("mean", mean.float())  # P x d
        self.register_buffer("inv_covariance", inv_covariance.float())  # P x d x d
        self.head = head

    def squared_distances(
        self, images: torch.Tensor, inv_covariance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Squared Mahalanobis distance of every patch to its position's Gaussian, ``N x h x w``
        (with another inverse covariance if given)."""
        emb = self.embedding(images)
        n, d, h, w = emb.shape
        if h * w != self.mean.shape[0]:
            raise ValueError(
                f"feature grid {h}x{w} does not match the fitted {self.mean.shape[0]} positions"
            )
        inv = self.inv_covariance if inv_covariance is None else inv_covariance
        delta = emb.flatten(2).permute(2, 0, 1) - self.mean.unsqueeze(1)  # P x N x d
        delta = delta.to(inv.dtype)
        m2 = (torch.bmm(delta, inv) * delta).sum(2)  # P x N
        return m2.clamp_min(0).t().reshape(n, h, w)

    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of every patch to its position's Gaussian, ``N x h x w``."""
        return self.squared_distances(images).sqrt()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.distances(images))


class GaussianAccumulator:
    """Per-position mean and covariance from streamed ``N x d x P`` batches (float64 sums)."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().to(torch.float64).permute(2, 0, 1)  # P x N x d
        if self.shift is None:
            self.shift = x.mean(1, keepdim=True)
            p, _, d = x.shape
            self.s1 = x.new_zeros((p, 1, d))
            self.s2 = x.new_zeros((p, d, d))
        xc = x - self.shift
        self.s1 += xc.sum(1, keepdim=True)
        self.s2 += torch.bmm(xc.transpose(1, 2), xc)
        self.n += x.shape[1]

    def finalize(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean ``P x d``, regularised covariance ``P x d x d``), float64."""
        if self.n < 3 or self.s1 is None or self.s2 is None or self.shift is None:
            raise ConfigError(f"PaDiM needs at least 3 training images, got {self.n}")
        mc = self.s1 / self.n
        cov = (self.s2 - self.n * mc.transpose(1, 2) @ mc) / (self.n - 1)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return (self.shift + mc)[:, 0], cov + eps * eye


@register("padim")
class PaDiM(FeatureDetector):
    """PaDiM on an offline pretrained timm backbone (see the module docstring).

    ``n_features``: size of the random channel subset (None: all channels);
    ``covariance_eps``: ridge added to every covariance; ``map_sigma``: smoothing of the map;
    ``tile_input_size``/``tile_stride``: score full-resolution images as overlapping tiles of
    ``image_size`` (one Gaussian per position of the stitched grid); ``precision``: ``"bf16"``
    runs the backbone in bfloat16 (faster on CPUs with AMX; scores move by a few percent, as
    Mahalanobis distances amplify small feature changes).
    """

    #: what model files from before these options were stored meant
    legacy_params = {"image_score": "map-max", "positional": "none", "map_sigma": 4.0}

    def __init__(
        self,
        image_size: int | Sequence[int] = DEFAULT_PADIM_IMAGE_SIZE,
        channels: int | None = None,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[int | str] | None = None,
        weights: str | os.PathLike[str] | None = None,
        n_features: int | None = 100,
        covariance_eps: float = 0.01,
        map_sigma: float = DEFAULT_PADIM_SIGMA,
        image_score: str = DEFAULT_PADIM_SCORE,
        topk_fraction: float = DEFAULT_TOPK_FRACTION,
        positional: str = DEFAULT_PADIM_POSITIONAL,
        tile_input_size: int | Sequence[int] | None = None,
        tile_stride: int | Sequence[int] | None = None,
        keep_aspect: bool = True,
        calibration_images: int | None = DEFAULT_CALIBRATION_IMAGES,
        precision: str = "float32",
        batch_size: int = 16,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(image_size, channels, backbone, layers, weights, map_sigma,
                         image_score, topk_fraction, positional, tile_input_size, tile_stride,
                         keep_aspect, calibration_images, precision, batch_size, device, seed,
                         progress)
        self.n_features = n_features
        self.covariance_eps = covariance_eps

    def validate(self) -> None:
        super().validate()
        if self.n_features is not None and self.n_features < 1:
            raise ConfigError(f"n_features={self.n_features}: must be positive")
        if self.covariance_eps < 0:
            raise ConfigError(f"covariance_eps={self.covariance_eps}: must be >= 0")

    def _embedding(self, extractor, channel_index: torch.Tensor) -> PatchEmbedding:
        return PatchEmbedding(extractor, local_pool=1, upsample="nearest",
                              channel_index=channel_index, precision=self.precision,
                              tiler=self._tiler(extractor))

    def _channel_index(self, total: int) -> torch.Tensor:
        """The seeded random channel subset (sorted), or all channels."""
        if self.n_features is None or self.n_features >= total:
            if self.n_features is not None and self.n_features > total:
                raise ConfigError(
                    f"n_features={self.n_features}: the chosen layers of {self.backbone} have "
                    f"only {total} channels"
                )
            return torch.arange(total)
        gen = torch.Generator().manual_seed(int(self.seed))
        return torch.randperm(total, generator=gen)[: self.n_features].sort().values

    # ------------------------------------------------------------------ training
    def _fit_features(
        self, extractor: FeatureExtractor, images: ImageInput, channels: int
    ) -> str:
        """One Gaussian per feature-grid position, from streamed moments."""
        index = self._channel_index(sum(extractor.channels))
        embedding = self._embedding(extractor, index.to(self.torch_device))
        acc = GaussianAccumulator()
        grid = (0, 0)
        with torch.inference_mode(), progress_bar(len(images), "padim features",
                                                  self.progress) as bar:
            for batch, _ in iter_batches(images, self.input_size, channels, self.batch_size):
                emb = embedding(torch.from_numpy(batch).to(self.torch_device))
                grid = (int(emb.shape[2]), int(emb.shape[3]))
                acc.update(emb.flatten(2))
                bar.update(len(batch))
        mean, cov = acc.finalize(self.covariance_eps)
        self.channel_index_ = index.cpu()
        self.mean_ = mean.float()
        self.inv_covariance_ = torch.linalg.inv(cov).float()
        self.grid_size_ = list(grid)
        # for the exact leave-one-out distances of _holdout_scores: A = a S + eps I, with S the
        # sample covariance without the ridge and a = (n-1)/(n-2) (the leave-one-out rescaling)
        n = acc.n
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        sample_cov = cov - self.covariance_eps * eye
        self._loo = (n, torch.linalg.inv((n - 1) / (n - 2) * sample_cov
                                         + self.covariance_eps * eye))  # float64: 1/(1-bq)
        # below amplifies rounding for images with high leverage
        return f"{mean.shape[0]} Gaussians of {mean.shape[1]} features"

    def _holdout_grids(
        self, pixels: torch.Tensor | None, positions: np.ndarray,
        embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Exact leave-one-image-out grids: each training image's patches measured against the
        Gaussians fitted without that image.

        Removing one of ``n`` images changes a position's mean by ``-u / (n-1)`` and its
        covariance by a rank-one term (``u``: the patch minus the full mean), so by the
        Sherman-Morrison formula the left-out squared distance is
        ``(n/(n-1))^2 q / (1 - b q)`` with ``q = u' A^-1 u``, ``A = (n-1)/(n-2) S + eps I`` and
        ``b = n / ((n-1)(n-2))``: no refit, one extra inverse per position.
        """
        del positions, embedding  # each image contributed equally; embeddings are not kept
        n, inv_a = self._loo
        b = n / ((n - 1) * (n - 2))
        scale = (n / (n - 1)) ** 2
        scorer = self._scorer_for_calibration()
        q = scorer.squared_distances(pixels, inv_a.to(pixels.device))
        loo = scale * q / (1.0 - b * q).clamp_min(1e-6)
        return loo.float().sqrt(), None

    # ------------------------------------------------------------------ inference
    def inference_module(self) -> PaDiMScorer:
        self._check_fitted()
        dev = self.torch_device
        embedding = self._embedding(self._extractor_on_device(), self.channel_index_.to(dev))
        return PaDiMScorer(embedding, self.mean_.to(dev), self.inv_covariance_.to(dev),
                           self.head()).to(dev).eval()

    def describe(self) -> dict[str, Any]:
        """Model facts for the model file's info and reports (includes the weight source)."""
        self._check_fitted()
        return {
            **self._describe_backbone(),
            "n_features": int(self.mean_.shape[1]),
            "positions": int(self.mean_.shape[0]),
            "grid_size": self.grid_size_,
            "image_score": self.image_score,
            "positional": self.positional,
        }

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {
            "channel_index": self.channel_index_.cpu(),
            "mean": self.mean_.cpu(),
            "inv_covariance": self.inv_covariance_.cpu(),
            **self._backbone_tensors(),
        }

    def load_state(self, learned: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.channel_index_ = tensors["channel_index"].long()
        self.mean_ = tensors["mean"].float()
        self.inv_covariance_ = tensors["inv_covariance"].float()
        super().load_state(learned, tensors)
