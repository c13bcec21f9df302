"""Gaussian smoothing of anomaly maps as a module (exports to ONNX as two convolutions)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GaussianBlur2d(nn.Module):
    """Separable Gaussian blur of ``N x 1 x H x W`` maps, reflect padding, radius 4 sigma.

    ``sigma <= 0`` is the identity.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = float(sigma)
        radius = max(1, int(math.ceil(4 * self.sigma))) if self.sigma > 0 else 0
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / max(self.sigma, 1e-6)) ** 2)
        self.register_buffer("kernel", (k / k.sum()), persistent=False)
        self.radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return x
        r = self.radius
        k = self.kernel.to(x.dtype)
        # reflect padding needs the pad to be smaller than the side; clamp for tiny maps
        mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
        x = F.pad(x, (r, r, 0, 0), mode=mode)
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, r, r), mode=mode)
        return F.conv2d(x, k.view(1, 1, -1, 1))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"
