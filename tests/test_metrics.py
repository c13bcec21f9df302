"""Metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from flawscope.metrics import aupro, image_metrics, pixel_auroc


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y * 1.2
    s[::7] = np.round(s[::7], 1)  # some ties
    thr = 0.4
    m = image_metrics(y, s, thr)
    pred = (s > thr).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["image_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["image_auprc"] == pytest.approx(average_precision_score(y, s))
    assert m["false_reject_rate"] == pytest.approx(pred[y == 0].mean())
    assert m["f1"] <= m["f1_max"] <= 1


def test_image_metrics_one_class_is_nan():
    m = image_metrics(np.zeros(5), np.arange(5.0), 2.0)
    assert np.isnan(m["image_auroc"]) and m["false_reject_rate"] == pytest.approx(0.4)


def test_pixel_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    masks = rng.random((4, 16, 16)) < 0.1
    maps = np.round(rng.random((4, 16, 16)) + masks * 0.5, 2).astype(np.float32)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_aupro_perfect_and_hand_computed():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True  # region A: 1 pixel
    masks[0, 2:4, 2:4] = True  # region B: 4 pixels
    perfect = masks.astype(np.float32)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    # A scores highest; B's pixels score below every normal pixel except nothing:
    # the normal pixels (11) score 0.5, region B 0.1 -> B is found only after fpr = 1.
    maps = np.full((1, 4, 4), 0.5, np.float32)
    maps[0, 0, 0] = 1.0
    maps[0, 2:4, 2:4] = 0.1
    # curve: fpr 0 -> pro 0.5 (A found, B not) ; then fpr jumps to 1 with pro 0.5
    # integrated to 0.3: area = 0.5 * 0.3 ; normalised -> 0.5
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_partial_overlap_interpolates():
    masks = np.zeros((1, 1, 10), bool)
    masks[0, 0, :2] = True  # one region of 2 pixels
    maps = np.array([[[0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.05]]], np.float32)
    # descending: 0.9 (region, pro .5), 0.8..0.2 normals (fpr 1/8 each), 0.1 region (pro 1)
    # up to fpr 0.3 pro stays 0.5 -> normalised area 0.5
    assert aupro(masks, maps) == pytest.approx(0.5)
    # no defect regions -> nan
    assert np.isnan(aupro(np.zeros((1, 3, 3), bool), np.zeros((1, 3, 3), np.float32)))


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_pixel_curves_walked_in_chunks_give_the_same_areas(monkeypatch, chunk):
    import flawscope.metrics as M

    rng = np.random.default_rng(3)
    maps = np.round(rng.random((4, 19, 23)).astype(np.float32) * 12) / 12  # many ties
    masks = np.zeros(maps.shape, bool)
    masks[0, 2:6, 3:9] = masks[2, 10:12, 1:4] = masks[3, 15:19, 15:23] = True
    maps[masks] += 0.15
    whole = (pixel_auroc(masks, maps), aupro(masks, maps), aupro(masks, maps, 0.05))
    monkeypatch.setattr(M, "CURVE_CHUNK", chunk)
    chunked = (pixel_auroc(masks, maps), aupro(masks, maps), aupro(masks, maps, 0.05))
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-12)
    assert chunked[0] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
