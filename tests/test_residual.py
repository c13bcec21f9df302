"""Residual statistics against scipy/numpy on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from flawscope.residual import STATISTICS, residual_statistics


def reference(img: np.ndarray) -> list[float]:
    """The seed's descriptive_statistics, with entropy of |residual| (see residual.py)."""
    x = img.reshape(-1)
    return [
        x.mean(), x.std(), x.var(), np.nan_to_num(stats.kurtosis(x)),
        np.nan_to_num(stats.skew(x)), x.max() - x.min(), x.min(), x.max(), x.cumsum()[-1],
        np.nan_to_num(stats.entropy(np.abs(x))), np.mean(x**2),
    ]


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (3, 3, 7, 5), (2, 16)])
def test_statistics_match_scipy(shape):
    rng = np.random.default_rng(sum(shape))
    r = rng.normal(size=shape) * rng.uniform(0.01, 1.0) + rng.uniform(-0.2, 0.2)
    r[0].flat[3] = 4.0  # an outlier so skewness/kurtosis are clearly non-zero
    got = residual_statistics(torch.from_numpy(r)).numpy()
    assert got.shape == (shape[0], len(STATISTICS))
    for i in range(shape[0]):
        np.testing.assert_allclose(got[i], reference(r[i]), rtol=1e-9, atol=1e-12)


def test_float32_close_to_float64():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(4, 1, 32, 32))
    a = residual_statistics(torch.from_numpy(r)).numpy()
    b = residual_statistics(torch.from_numpy(r).float()).numpy()
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-4)


def test_constant_residual_gives_zero_shape_statistics():
    r = torch.full((2, 1, 4, 4), 0.25, dtype=torch.float64)
    r[1] = 0.0
    got = residual_statistics(r).numpy()
    idx = {n: i for i, n in enumerate(STATISTICS)}
    assert got[0, idx["kurtosis"]] == 0 and got[0, idx["skewness"]] == 0
    assert got[0, idx["entropy"]] == pytest.approx(np.log(16))
    assert got[1, idx["entropy"]] == 0  # all-zero residual: no distribution, 0 as in the seed
    assert got[0, idx["cumsum"]] == pytest.approx(4.0)
