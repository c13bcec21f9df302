"""NeighborConv2d: seed and fast forms agree, centre pixel ignored, Keras Glorot init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flawscope.errors import ConfigError
from flawscope.nn import NeighborConv2d
from flawscope.nn.neighbor_conv import NEIGHBOR_OFFSETS

# (batch, in_channels, out_channels, H, W)
SHAPES = [
    (1, 1, 4, 7, 9),
    (2, 1, 6, 8, 8),
    (3, 3, 5, 9, 11),
    (2, 5, 7, 13, 6),
    (4, 5, 2, 5, 5),
]


def _layer(cin: int, cout: int, impl: str, seed: int = 0, bias: bool = True) -> NeighborConv2d:
    torch.manual_seed(seed)
    layer = NeighborConv2d(cin, cout, bias=bias, impl=impl).double()
    if bias:
        with torch.no_grad():  # non-zero bias so the bias path is exercised
            layer.bias.uniform_(-1.0, 1.0)
    return layer


def _forward_backward(layer: NeighborConv2d, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(g)
    grads = [x.grad, layer.weight.grad]
    if layer.bias is not None:
        grads.append(layer.bias.grad)
    return y.detach(), grads


def _reference(x: torch.Tensor, layer: NeighborConv2d) -> torch.Tensor:
    """Direct loop over the 8 neighbours: y[o] = b[o] + sum_{c,k} w[o,c,k] x[c, p + offset_k]."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.zeros(n, layer.out_channels, h, w, dtype=x.dtype)
    for k, (dy, dx) in enumerate(NEIGHBOR_OFFSETS):
        view = padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        out += torch.einsum("oc,nchw->nohw", layer.weight[:, :, k].detach(), view)
    if layer.bias is not None:
        out += layer.bias.detach().view(1, -1, 1, 1)
    return out


@pytest.mark.parametrize("n,cin,cout,h,w", SHAPES)
def test_seed_and_fast_same_outputs_and_gradients(n, cin, cout, h, w):
    seed_layer = _layer(cin, cout, "seed")
    fast_layer = _layer(cin, cout, "fast")
    assert torch.equal(seed_layer.weight, fast_layer.weight)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, cin, h, w, dtype=torch.float64, generator=gen)
    g = torch.randn(n, cout, h, w, dtype=torch.float64, generator=gen)
    y_seed, grads_seed = _forward_backward(seed_layer, x, g)
    y_fast, grads_fast = _forward_backward(fast_layer, x, g)
    assert y_seed.shape == (n, cout, h, w)
    torch.testing.assert_close(y_fast, y_seed, atol=1e-6, rtol=0)
    # Both match an independent direct sum over the 8 neighbours.
    torch.testing.assert_close(y_seed, _reference(x, seed_layer), atol=1e-6, rtol=0)
    names = ["input", "weight", "bias"]
    for name, a, b in zip(names, grads_seed, grads_fast, strict=True):
        assert a is not None and b is not None, name
        assert a.abs().max() > 0, name
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=f"grad {name} differs")


def test_gradients_match_finite_differences():
    for impl in ("seed", "fast"):
        layer = _layer(2, 3, impl)
        x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,), atol=1e-6)


def test_no_bias():
    for impl in ("seed", "fast"):
        layer = _layer(3, 4, impl, bias=False)
        assert layer.bias is None
        assert sum(p.numel() for p in layer.parameters()) == 3 * 4 * 8
        x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
        torch.testing.assert_close(layer(x), _reference(x, layer), atol=1e-10, rtol=0)


def test_seed_example_has_2304_parameters():
    layer = NeighborConv2d(1, 256)
    assert sum(p.numel() for p in layer.parameters()) == 2304
    assert layer.weight.shape == (256, 1, 8)
    assert layer.bias.shape == (256,)
    assert sum(p.numel() for p in NeighborConv2d(3, 16).parameters()) == 3 * 16 * 8 + 16


@pytest.mark.parametrize("impl", ["seed", "fast"])
@pytest.mark.parametrize("cin", [1, 3])
def test_output_ignores_centre_pixel(impl, cin):
    layer = _layer(cin, 4, impl)
    x = torch.randn(2, cin, 7, 8, dtype=torch.float64)
    i, j = 3, 4
    x2 = x.clone()
    x2[1, :, i, j] += 5.0  # perturb every channel of one pixel
    with torch.no_grad():
        y, y2 = layer(x), layer(x2)
    diff = (y2 - y).abs().amax(dim=1)  # (N, H, W)
    assert diff[1, i, j] < 1e-12, "output depends on its own pixel"
    for dy, dx in NEIGHBOR_OFFSETS:
        assert diff[1, i + dy, j + dx] > 1e-3, f"neighbour ({dy},{dx}) unaffected"
    # Nothing outside the 3x3 window, nor the other batch item, changes.
    mask = torch.zeros_like(diff, dtype=torch.bool)
    mask[1, i - 1 : i + 2, j - 1 : j + 2] = True
    assert diff[~mask].max() < 1e-12


def test_glorot_uniform_init():
    torch.manual_seed(0)
    cin, cout = 32, 256
    layer = NeighborConv2d(cin, cout)
    limit = math.sqrt(6.0 / (8 * cin + cout))
    assert layer.glorot_limit() == pytest.approx(limit)
    w = layer.weight.detach()
    assert w.abs().max() <= limit
    assert w.abs().max() > 0.99 * limit  # fills the range, not a narrower one
    assert w.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.02)
    assert w.mean().abs().item() < 0.01 * limit
    assert torch.count_nonzero(layer.bias) == 0
    # Seed example: 1 -> 256, fan_in 8, fan_out 256.
    small = NeighborConv2d(1, 256)
    assert small.glorot_limit() == pytest.approx(math.sqrt(6.0 / 264))
    assert small.weight.abs().max() <= small.glorot_limit()


@pytest.mark.parametrize("impl", ["seed", "fast"])
def test_equals_conv2d_with_dense_kernel(impl):
    layer = _layer(3, 5, impl)
    dense = layer.dense_weight()
    assert dense.shape == (5, 3, 3, 3)
    assert torch.count_nonzero(dense[:, :, 1, 1]) == 0
    # The 8 taps land at the documented offsets.
    for k, (dy, dx) in enumerate(NEIGHBOR_OFFSETS):
        assert torch.equal(dense[:, :, 1 + dy, 1 + dx], layer.weight[:, :, k])
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64)
    expected = F.conv2d(x, dense.detach(), layer.bias.detach(), padding=1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)


def test_fast_is_the_default_and_auto_is_gone():
    # Benchmarked: the fast form wins at every measured shape (see neighbor_conv._IMPLS).
    assert NeighborConv2d(1, 64).impl == "fast"
    with pytest.raises(ConfigError, match="impl"):
        NeighborConv2d(1, 64, impl="auto")


def test_float32_forward_close():
    torch.manual_seed(0)
    layer = NeighborConv2d(4, 8, impl="seed")
    fast = NeighborConv2d(4, 8, impl="fast")
    fast.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=1e-5)


def test_state_dict_and_repr():
    layer = NeighborConv2d(3, 7, impl="fast")
    assert set(layer.state_dict()) == {"weight", "bias"}
    text = repr(layer)
    assert "NeighborConv2d(3, 7" in text and "impl='fast'" in text
    assert "bias=False" in repr(NeighborConv2d(2, 2, bias=False))


def test_bad_arguments():
    with pytest.raises(ConfigError, match=r"impl must be one of .*got 'winograd'"):
        NeighborConv2d(3, 4, impl="winograd")
    with pytest.raises(ConfigError, match=r"in_channels and out_channels must be >= 1, got 0"):
        NeighborConv2d(0, 4)
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\), got \(1, 2, 5, 5\)"):
        NeighborConv2d(3, 4)(torch.randn(1, 2, 5, 5))
