"""Neighbor convolution: a 3x3 convolution that ignores the centre pixel.

Each output pixel is a linear function of the 8 neighbours of the input pixel, never of the
pixel itself, so an autoencoder built from it must predict pixels from context and cannot learn
the identity. The layer is linear; callers add activations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flawscope.errors import ConfigError

__all__ = ["NEIGHBOR_OFFSETS", "NeighborConv2d"]

#: (dy, dx) of the 8 taps, row-major over the 3x3 window with the centre skipped.
NEIGHBOR_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1),
    (0, -1),           (0, 1),
    (1, -1),  (1, 0),  (1, 1),
)  # fmt: skip

#: ``"fast"``: one 3x3 convolution with a zero centre; ``"seed"``: the original formulation.
#: ``fast`` is the default: measured with ``benchmarks/bench_neighbor_conv.py`` (float32, batch
#: 16, forward + backward, 2-core CPU) it was 1.3-6.5x faster at every shape tried (1->64 and
#: 3->32 @256 px, 64->64 @128 px, 1->1, 8->1, 1->256, 16->16, 256->256), and 1.7-9.7x in
#: float64 and bfloat16: the seed form writes an (N, 8C, H, W) copy of the input and moves
#: ~8x more memory for the same FLOPs. ``seed`` stays as the reference.
_IMPLS = ("fast", "seed")


class NeighborConv2d(nn.Module):
    """Linear 3x3 convolution without the centre tap ("same" size output, zero padding).

    Args:
        in_channels: input channels C.
        out_channels: number of filters.
        bias: add a learned bias per filter (initialised to zero).
        impl: ``"fast"`` (default: one ``F.conv2d`` with a 3x3 kernel whose centre is zero;
            keeps a channels_last input channels_last) or ``"seed"`` (pad, 8 shifted copies
            stacked as channels, 1x1 conv: the original formulation, slower at every measured
            shape). Both give the same result.

    Parameters: ``weight`` ``(out_channels, in_channels, 8)``, taps ordered as
    :data:`NEIGHBOR_OFFSETS`; ``bias`` ``(out_channels,)``. Initialisation is Keras'
    Glorot-uniform for the seed's 1x1 kernel over 8*C channels: fan_in = 8*C, fan_out =
    out_channels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, bias: bool = True, impl: str = "fast"
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ConfigError(
                f"NeighborConv2d: in_channels and out_channels must be >= 1, "
                f"got {in_channels} and {out_channels}"
            )
        if impl not in _IMPLS:
            raise ConfigError(f"NeighborConv2d: impl must be one of {_IMPLS}, got {impl!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 8))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def glorot_limit(self) -> float:
        """Bound of the Glorot-uniform init: sqrt(6 / (8*in_channels + out_channels))."""
        return math.sqrt(6.0 / (8 * self.in_channels + self.out_channels))

    def reset_parameters(self) -> None:
        """Glorot-uniform weight, zero bias (as the seed's Keras layer)."""
        limit = self.glorot_limit()
        nn.init.uniform_(self.weight, -limit, limit)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent ``(out, in, 3, 3)`` conv kernel, centre fixed at zero (differentiable)."""
        w = self.weight
        centre = w.new_zeros(w.shape[0], w.shape[1], 1)
        return torch.cat([w[..., :4], centre, w[..., 4:]], dim=-1).reshape(
            w.shape[0], w.shape[1], 3, 3
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"NeighborConv2d expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.impl == "seed":
            return self._forward_seed(x)
        return F.conv2d(x, self.dense_weight(), self.bias, padding=1)

    def _forward_seed(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        padded = F.pad(x, (1, 1, 1, 1))
        shifted = [
            padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in NEIGHBOR_OFFSETS
        ]
        # (N, C, 8, H, W) -> (N, C*8, H, W): channel index c*8 + k matches weight.reshape(out, C*8).
        stacked = torch.stack(shifted, dim=2).reshape(n, c * 8, h, w)
        kernel = self.weight.reshape(self.out_channels, c * 8, 1, 1)
        return F.conv2d(stacked, kernel, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}, "
            f"impl={self.impl!r}"
        )
