"""Overlapping tiles for high-resolution images with small defects.

Instead of shrinking a large image to the model's input size (and shrinking a small defect
below the backbone's resolution with it), the image is cut into overlapping tiles of the input
size, each tile goes through the network at full resolution, and the per-tile results
(feature grids or anomaly maps) are stitched back, averaging where tiles overlap.

Tile positions are fixed by the image, tile and stride sizes alone, so :class:`Tiler` is a plain
``nn.Module`` with no data-dependent control flow (traceable for ONNX export).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flawscope.data.images import as_size
from flawscope.errors import ConfigError


def tile_starts(length: int, tile: int, stride: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with step ``stride``.

    The last tile is moved back so it ends at the border (it overlaps its neighbour more).
    All offsets are multiples of ``align`` (``length`` and ``tile`` must be too).
    """
    if tile > length:
        raise ConfigError(f"tile size {tile} is larger than the image side {length}")
    if stride < 1 or stride > tile:
        raise ConfigError(f"tile stride {stride}: must be between 1 and the tile size {tile}")
    if length % align or tile % align or stride % align:
        raise ConfigError(
            f"image side {length}, tile {tile} and stride {stride} must be multiples of {align}"
        )
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


class Tiler(nn.Module):
    """Cut ``N x C x H x W`` images into overlapping tiles and stitch results back.

    ``image_size``: (H, W) of the full images; ``tile_size``: side(s) of a tile; ``stride``:
    step between tiles (default: half a tile, i.e. 50 % overlap); ``align``: tile offsets are
    multiples of it (e.g. the feature stride of a backbone, so that feature grids of
    neighbouring tiles line up).
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        tile_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        align: int = 1,
    ) -> None:
        super().__init__()
        self.image_size = as_size(image_size)
        self.tile_size = as_size(tile_size)
        if stride is None:
            stride = tuple(max(align, (t // 2) // align * align) for t in self.tile_size)
        self.stride = as_size(stride)
        self.align = align
        self.ys = tile_starts(self.image_size[0], self.tile_size[0], self.stride[0], align)
        self.xs = tile_starts(self.image_size[1], self.tile_size[1], self.stride[1], align)

    @property
    def positions(self) -> list[tuple[int, int]]:
        """Top-left corner (y, x) of every tile, row by row."""
        return [(y, x) for y in self.ys for x in self.xs]

    @property
    def num_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def tile(self, images: torch.Tensor) -> torch.Tensor:
        """``N x C x H x W`` -> ``(N * T) x C x th x tw`` (tiles of one image are adjacent)."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"tiler built for {self.image_size} images, got {tuple(images.shape[-2:])}"
            )
        th, tw = self.tile_size
        tiles = [images[:, :, y : y + th, x : x + tw] for y, x in self.positions]
        return torch.stack(tiles, 1).flatten(0, 1)

    def untile(self, tiles: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """Stitch ``(N * T) x C x th/scale x tw/scale`` tile results into ``N x C x H/s x W/s``.

        ``scale``: how much smaller the tile results are than the tiles (e.g. the feature
        stride); overlapping results are averaged.
        """
        if any(v % scale for v in (*self.image_size, *self.tile_size)) or any(
            p % scale for p in (*self.ys, *self.xs)
        ):
            raise ValueError(f"tile geometry is not divisible by scale {scale}")
        t = self.num_tiles
        n = tiles.shape[0] // t
        h, w = self.image_size[0] // scale, self.image_size[1] // scale
        th, tw = tiles.shape[-2:]
        if (th * scale, tw * scale) != self.tile_size:
            raise ValueError(f"tile results of {th}x{tw} do not match tiles / {scale}")
        per_image = tiles.reshape(n, t, *tiles.shape[1:])
        out = tiles.new_zeros((n, tiles.shape[1], h, w))
        count = tiles.new_zeros((1, 1, h, w))
        for i, (y, x) in enumerate(self.positions):
            ys, xs = y // scale, x // scale
            out[:, :, ys : ys + th, xs : xs + tw] += per_image[:, i]
            count[:, :, ys : ys + th, xs : xs + tw] += 1
        return out / count

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, tile_size={self.tile_size}, stride={self.stride}, "
            f"tiles={len(self.ys)}x{len(self.xs)}"
        )
