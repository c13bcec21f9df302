"""The map head's upsample + blur as matrix products equals the convolution form."""

import pytest
import torch
import torch.nn.functional as F

from flawscope.nn.blur import GaussianBlur2d, upsample_blur


@pytest.mark.parametrize(("sigma", "grid", "size"), [
    (8.0, (40, 40), (320, 320)),   # PatchCore's default map
    (4.0, (28, 28), (224, 224)),   # PaDiM's
    (8.0, (30, 40), (240, 320)),   # a photo's aspect ratio
    (0.0, (40, 40), (320, 320)),   # no smoothing
    (8.0, (4, 4), (32, 32)),       # radius beyond the side: replicate padding
    (2.0, (5, 7), (40, 56)),
])
def test_upsample_blur_equals_interpolate_then_blur(sigma, grid, size):
    g = torch.randn(3, *grid, generator=torch.Generator().manual_seed(0))
    blur = GaussianBlur2d(sigma)
    ref = blur(F.interpolate(g.unsqueeze(1), size=size, mode="bilinear",
                             align_corners=False))[:, 0]
    out = upsample_blur(g, size, blur)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # a spike stays where it was (no transposed axis) and the map keeps its mass
    spike = torch.zeros(1, *grid)
    spike[0, 1, grid[1] - 2] = 1.0
    torch.testing.assert_close(upsample_blur(spike, size, blur),
                               blur(F.interpolate(spike.unsqueeze(1), size=size,
                                                  mode="bilinear", align_corners=False))[:, 0],
                               atol=1e-6, rtol=1e-5)
