"""Neural-network building blocks."""

from flawscope.nn.neighbor_conv import NeighborConv2d

__all__ = ["NeighborConv2d"]
