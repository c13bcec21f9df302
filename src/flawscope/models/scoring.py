"""From a grid of patch scores to an anomaly map and an image score: shared by PatchCore and
PaDiM (and, through them, the ensemble), in plain torch so the ONNX export computes the same.

``positional="mean"``
    Positional normalisation: every grid position's score minus the mean score that position
    has on good images (the detector's out-of-sample calibration maps of its training goods,
    ``positional_mean_``). Some parts of a photo are always busier than others (edges,
    borders, text, a tile's rim); subtracting their usual level lets a defect elsewhere stand
    out at the same threshold. The calibration scores themselves are computed with each image's
    own map left out of that mean (:func:`leave_one_out_means`), so the threshold stays
    out of sample.
``image_score``
    ``"map-max"``: the maximum of the (normalised, smoothed) anomaly map: the verdict and the
    defect regions then come from one map and one threshold. ``"topk-mean"``: the mean of the
    ``topk_fraction`` highest grid scores. ``"reweighted-max"`` (PatchCore only): the paper's
    re-weighted maximum patch distance.

Benchmarks that chose the defaults: docs/detection-quality.md ("Image scores").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from flawscope.errors import ConfigError
from flawscope.nn.blur import GaussianBlur2d, upsample_blur

IMAGE_SCORES = ("map-max", "topk-mean", "reweighted-max")
POSITIONAL = ("none", "mean")
DEFAULT_IMAGE_SCORE = "map-max"
DEFAULT_POSITIONAL = "mean"
DEFAULT_TOPK_FRACTION = 0.01


def check_scoring(image_score: str, positional: str, topk_fraction: float,
                  allowed: tuple[str, ...] = IMAGE_SCORES) -> None:
    """Refuse unknown score rules (naming the option and the choices)."""
    if image_score not in allowed:
        raise ConfigError(f"image_score={image_score!r}: choose from {', '.join(allowed)}")
    if positional not in POSITIONAL:
        raise ConfigError(f"positional={positional!r}: choose from {', '.join(POSITIONAL)}")
    if not 0 < topk_fraction <= 1:
        raise ConfigError(f"topk_fraction={topk_fraction}: must be in (0, 1]")


def leave_one_out_means(grids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-position mean of ``N x h x w`` grids, and for every image the mean of the
    *other* images (``N x h x w``): what that image's grid is normalised with during
    calibration, so its calibration score stays out of sample."""
    g = np.asarray(grids, dtype=np.float64)
    n = len(g)
    total = g.sum(0)
    mean = total / n
    if n < 2:
        return mean, np.broadcast_to(mean, g.shape).copy()
    return mean, (total[None] - g) / (n - 1)


class MapHead(nn.Module):
    """``N x h x w`` patch scores -> (image score ``N``, anomaly map ``N x H x W``).

    ``positional_mean``: ``h x w`` mean grid of good images (subtracted first), or None;
    ``image_score``: ``map-max`` or ``topk-mean`` (``reweighted-max`` is computed by PatchCore
    itself; the head then only draws the map).
    """

    def __init__(
        self,
        output_size: tuple[int, int],
        map_sigma: float,
        image_score: str = DEFAULT_IMAGE_SCORE,
        topk_fraction: float = DEFAULT_TOPK_FRACTION,
        positional_mean: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.output_size = tuple(int(v) for v in output_size)
        self.blur = GaussianBlur2d(map_sigma)
        self.image_score = image_score
        self.topk_fraction = float(topk_fraction)
        if positional_mean is not None:
            self.register_buffer("positional_mean", positional_mean.float())
        else:
            self.positional_mean = None

    def normalise(self, grid: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """``grid`` minus the positional mean (``mean``: per-image means ``N x h x w`` to use
        instead, the leave-one-out means of calibration)."""
        if mean is not None:
            return grid - mean.to(grid.dtype)
        if self.positional_mean is None:
            return grid
        if grid.shape[-2:] != self.positional_mean.shape:
            raise ValueError(f"patch grid {tuple(grid.shape[-2:])} does not match the fitted "
                             f"positional statistics {tuple(self.positional_mean.shape)}")
        return grid - self.positional_mean

    def anomaly_map(self, grid: torch.Tensor) -> torch.Tensor:
        """Upsample a (normalised) grid to the input size and smooth it."""
        return upsample_blur(grid, self.output_size, self.blur)

    def score(self, grid: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        """The image score of a normalised grid and its map."""
        if self.image_score == "topk-mean":
            flat = grid.flatten(1)
            k = max(1, int(math.ceil(self.topk_fraction * flat.shape[1])))
            return flat.topk(k, dim=1).values.mean(1)
        return amap.flatten(1).amax(1)

    def forward(
        self, grid: torch.Tensor, mean: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.normalise(grid, mean)
        amap = self.anomaly_map(norm)
        return self.score(norm, amap), amap
