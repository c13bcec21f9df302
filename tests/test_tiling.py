"""Overlapping tiles and stitching (flawscope.tiling), and tiled PatchCore/PaDiM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flawscope.data.dataset import open_dataset
from flawscope.data.source import to_array
from flawscope.errors import ConfigError
from flawscope.models import create
from flawscope.tiling import Tiler, tile_starts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tile_starts_cover_and_end_at_border():
    assert tile_starts(128, 64, 32) == [0, 32, 64]
    assert tile_starts(100, 64, 32) == [0, 32, 36]  # last tile moved back to the border
    assert tile_starts(64, 64, 16) == [0]
    assert tile_starts(112, 64, 32, align=16) == [0, 32, 48]
    with pytest.raises(ConfigError, match="larger than the image"):
        tile_starts(32, 64, 32)
    with pytest.raises(ConfigError, match="multiples of 16"):
        tile_starts(100, 64, 32, align=16)
    with pytest.raises(ConfigError, match="stride"):
        tile_starts(128, 64, 96)


def test_tile_untile_round_trip():
    tiler = Tiler((96, 128), 64, 32)
    assert tiler.positions == [(0, 0), (0, 32), (0, 64), (32, 0), (32, 32), (32, 64)]
    x = torch.rand(2, 3, 96, 128)
    tiles = tiler.tile(x)
    assert tiles.shape == (12, 3, 64, 64)
    torch.testing.assert_close(tiles[7], x[1, :, 0:64, 32:96])  # image 1, tile 1
    torch.testing.assert_close(tiler.untile(tiles), x)
    with pytest.raises(ValueError, match="built for"):
        tiler.tile(torch.rand(1, 3, 64, 64))


def test_stitching_a_constant_map_returns_it():
    tiler = Tiler((128, 96), 64, 32, align=8)
    results = torch.full((2 * tiler.num_tiles, 1, 8, 8), 3.5)  # feature-grid-sized results
    out = tiler.untile(results, scale=8)
    assert out.shape == (2, 1, 16, 12)
    torch.testing.assert_close(out, torch.full_like(out, 3.5))


def test_overlaps_are_averaged():
    tiler = Tiler((1, 6), (1, 4), (1, 2))  # tiles at x = 0 and 2, overlap at x = 2..3
    out = tiler.untile(torch.tensor([[[[1.0, 1, 1, 1]]], [[[3.0, 3, 3, 3]]]]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.0, 1, 2, 2, 3, 3]))


def test_defect_in_corner_tile_lands_at_the_right_place():
    tiler = Tiler((128, 128), 64, 32)
    results = torch.zeros(tiler.num_tiles, 1, 64, 64)
    last = tiler.num_tiles - 1  # bottom-right tile at (64, 64)
    assert tiler.positions[last] == (64, 64)
    results[last, 0, 50:54, 40:44] = 1.0  # tile-local position of the "defect"
    stitched = tiler.untile(results)[0, 0]
    ys, xs = torch.nonzero(stitched).T
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (114, 117, 104, 107)
    # only the corner tile covers (114, 104): no averaging down
    assert stitched[115, 105] == 1.0


@pytest.mark.parametrize("model", ["patchcore", "padim"])
def test_tiled_detector_finds_small_defect_in_corner(synthetic_root, model):
    """Fit on 128 px images as 64 px tiles; a small dark spot in a corner is found there."""
    tile = open_dataset(synthetic_root / "tile")
    train = to_array(tile.train[:16], 128, 1)
    opts = {"coreset_ratio": 0.25} if model == "patchcore" else {"n_features": 50}
    det = create(model, image_size=64, tile_input_size=128, device="cpu", progress=False,
                 batch_size=8, **opts).fit(train)
    assert det.input_size == (128, 128)
    good = to_array([s for s in tile.test if s.label == 0][:1], 128, 1)
    bad = good.copy()
    bad[0, 0, 108:116, 112:120] = 0  # 8 x 8 px spot near the bottom-right corner
    scores, maps = det.score(np.concatenate([good, bad]))
    assert maps.shape == (2, 128, 128)
    assert scores[1] > scores[0]
    y, x = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert 96 <= y < 128 and 96 <= x < 128, (y, x)
    info = det.describe()
    assert info["tiles"].startswith("9 tiles of [64, 64] px")


def test_cli_tile_option(synthetic_root, tmp_path):
    from flawscope.cli import main
    from flawscope.modelfile import load_model

    model = tmp_path / "tiled.safetensors"
    rc = main(["fit", str(synthetic_root / "tile"), "--model", "padim", "-o", str(model),
               "--image-size", "64", "--tile", "128", "--device", "cpu", "--quiet",
               "--param", "n_features=20"])
    assert rc == 0
    config, _ = load_model(model)
    assert config["architecture"]["params"]["tile_input_size"] == 128
    assert config["input_size"] == [128, 128]


def test_tiling_geometry_is_checked():
    with pytest.raises(ConfigError, match="multiple of the backbone"):
        create("patchcore", image_size=60, tile_input_size=120, device="cpu",
               progress=False).fit(np.zeros((2, 1, 120, 120), np.uint8))
