"""Threshold calibration and score normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from flawscope.errors import ConfigError
from flawscope.threshold import ScoreNormalization, calibrate_f1, calibrate_good_quantile


def test_good_quantile_rejects_at_most_target_on_fresh_goods():
    rng = np.random.default_rng(0)
    t = calibrate_good_quantile(rng.normal(size=500), max_frr=0.01)
    assert t.rule == "good-quantile" and t.certified
    assert t.frr_calibration <= 0.01
    fresh = rng.normal(size=200_000)
    # conformal guarantee: expected false-reject rate <= target
    assert np.mean(fresh > t.value) <= 0.013


def test_good_quantile_conformal_rank():
    scores = np.arange(1, 100, dtype=float)  # n = 99, (n+1)*0.95 = 95 -> 95th smallest
    t = calibrate_good_quantile(scores, max_frr=0.05)
    assert t.value == 95.0
    assert t.frr_calibration == pytest.approx(4 / 99)


def test_too_few_calibration_images_is_flagged():
    t = calibrate_good_quantile(np.arange(10.0), max_frr=0.01)
    assert not t.certified and t.value == 9.0 and t.notes
    # the honest bound with the maximum of n = 10 scores is 1 / 11, and every text says so
    assert t.frr_bound == pytest.approx(1 / 11)
    assert "NOT certified" in t.describe() and "9.09%" in t.describe()
    assert "9.09%" in t.summary() and "not certified" in t.summary()


def test_certified_bound_is_the_target_and_matches_fresh_goods():
    rng = np.random.default_rng(1)
    t = calibrate_good_quantile(rng.normal(size=999), max_frr=0.02)
    assert t.certified and t.frr_bound == pytest.approx(0.02)
    assert t.summary() == "≤ 2.00% of good parts rejected"


def test_frr_warning_only_when_significantly_above_the_bound():
    t = calibrate_good_quantile(np.arange(500.0), max_frr=0.01)
    assert t.frr_warning(0, 100) is None
    assert t.frr_warning(2, 100) is None  # 2 % on 100 goods: within chance of a 1 % rate
    warning = t.frr_warning(44, 100)
    assert warning is not None and "44 of 100" in warning and "1.00%" in warning
    f1 = calibrate_f1(np.array([0.1, 0.2]), np.array([0.5, 0.6]))
    assert f1.frr_bound is None and f1.frr_warning(50, 100) is None


def test_f1_optimal_separable():
    good = np.array([0.1, 0.2, 0.3, 0.35])
    bad = np.array([0.5, 0.6, 0.9])
    t = calibrate_f1(good, bad)
    assert 0.35 < t.value < 0.5
    assert t.f1_calibration == 1.0 and t.recall_calibration == 1.0 and t.frr_calibration == 0


def test_f1_optimal_overlap_maximises_f1():
    rng = np.random.default_rng(3)
    good, bad = rng.normal(0, 1, 300), rng.normal(1.5, 1, 100)
    t = calibrate_f1(good, bad)

    def f1(v):
        tp, fp, fn = (bad > v).sum(), (good > v).sum(), (bad <= v).sum()
        return 2 * tp / (2 * tp + fp + fn)

    best = max(f1(v) for v in np.r_[good, bad])
    assert f1(t.value) == pytest.approx(best)
    assert t.f1_calibration == pytest.approx(best)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="no scores"):
        calibrate_good_quantile(np.array([]))
    with pytest.raises(ConfigError, match="NaN"):
        calibrate_good_quantile(np.array([1.0, np.nan]))
    with pytest.raises(ConfigError, match="max_frr"):
        calibrate_good_quantile(np.array([1.0]), max_frr=1.5)


def test_normalization_maps_threshold_to_half_and_is_monotone():
    n = ScoreNormalization.fit(np.array([1.0, 2.0, 3.0]), threshold=4.0)
    assert n(np.array([4.0]))[0] == pytest.approx(0.5)
    assert n(np.array([2.0]))[0] == pytest.approx(0.0)
    assert n(np.array([6.0]))[0] == pytest.approx(1.0)
    s = np.linspace(0, 8, 50)
    assert np.all(np.diff(n(s)) >= 0)
