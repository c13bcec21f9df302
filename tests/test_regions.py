"""Defect regions: segmentation rule, region metrics, overlays, model-file round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flawscope.errors import ConfigError
from flawscope.heatmap import (
    OUTLINE_COLOR,
    TRANSPARENT_BELOW,
    draw_outlines,
    heatmap_rgba,
    outline,
    overlay_rgb,
)
from flawscope.metrics import pixel_overlap, region_match, region_metrics
from flawscope.modelfile import load_model, save_model
from flawscope.pipeline import MODEL_KIND, Inspector
from flawscope.regions import (
    MAP_QUANTILES,
    RegionRule,
    find_regions,
    map_quantile_stats,
    pixel_threshold_from_stats,
    region_mask,
)


def two_blobs() -> np.ndarray:
    amap = np.zeros((20, 40))
    amap[2:6, 3:9] = 5.0  # 4 x 6 = 24 cells
    amap[10:12, 30:31] = 9.0  # 2 cells
    return amap


# ---------------------------------------------------------------------------- regions
def test_regions_scaled_to_the_original_image():
    amap = two_blobs()
    regions = find_regions(amap, RegionRule(1.0, min_region_area=0), (40, 120))  # 2x, 3x
    assert [r.peak for r in regions] == [False, False]
    top, big = regions  # sorted by max score
    assert top.max_score == 9.0 and top.bbox == [90, 20, 93, 24] and top.area_px == 2 * 6
    assert big.bbox == [9, 4, 27, 12] and big.area_px == 24 * 6 and big.max_score == 5.0
    assert big.to_dict() == {"bbox": [9, 4, 27, 12], "area_px": 144, "max_score": 5.0,
                             "peak": False, "status": "defect"}


def test_min_area_in_pixels_and_mm2():
    amap = two_blobs()
    assert len(find_regions(amap, RegionRule(1.0, min_region_area=24))) == 1
    assert len(find_regions(amap, RegionRule(1.0, min_region_area=25))) == 1  # peak region
    assert find_regions(amap, RegionRule(1.0, min_region_area=25))[0].peak
    # 0.5 mm per pixel: the big blob is 24 px = 6 mm^2
    rule = RegionRule(1.0, mm_per_pixel=0.5, min_region_mm2=5.0)
    (r,) = find_regions(amap, rule)
    assert r.area_px == 24 and r.area_mm2 == pytest.approx(6.0) and not r.peak
    assert r.to_dict()["area_mm2"] == pytest.approx(6.0)


def test_ok_images_get_watch_regions_only_above_the_pixel_threshold():
    amap = two_blobs()
    # an OK part whose map crosses the pixel threshold: the same regions, marked "watch"
    watch = find_regions(amap, RegionRule(1.0, min_region_area=0), defect=False)
    assert [r.status for r in watch] == ["watch", "watch"] and not any(r.peak for r in watch)
    assert [r.bbox for r in watch] == [r.bbox for r in
                                       find_regions(amap, RegionRule(1.0, min_region_area=0))]
    assert watch[0].to_dict()["status"] == "watch"
    # below the minimum area, or nothing above the threshold: no region and no peak region
    assert find_regions(amap, RegionRule(1.0), defect=False) == []
    assert find_regions(amap, RegionRule(100.0), defect=False) == []
    assert not region_mask(amap, RegionRule(100.0), defect=False).any()
    assert region_mask(amap, RegionRule(1.0, min_region_area=0), defect=False).sum() == 26


def test_defect_images_always_get_a_region():
    amap = two_blobs()
    # nothing above the pixel threshold: the peak region around the maximum
    (peak,) = find_regions(amap, RegionRule(100.0))
    assert peak.peak and peak.max_score == 9.0 and peak.bbox == [30, 10, 31, 12]
    assert region_mask(amap, RegionRule(100.0)).sum() == 2


def test_regions_are_8_connected():
    amap = np.zeros((6, 6))
    amap[1, 1] = amap[2, 2] = amap[3, 3] = 1.0  # diagonal chain: one region
    (r,) = find_regions(amap, RegionRule(0.5, min_region_area=0))
    assert r.bbox == [1, 1, 4, 4] and r.area_px == 3


def test_rule_options_are_checked():
    with pytest.raises(ConfigError, match="min_region_mm2 needs mm_per_pixel"):
        RegionRule(1.0, min_region_mm2=2.0)
    with pytest.raises(ConfigError, match="min_region_area"):
        RegionRule(1.0, min_region_area=-1)
    with pytest.raises(ConfigError, match="mm_per_pixel"):
        RegionRule(1.0, mm_per_pixel=0)
    with pytest.raises(ConfigError, match="pixel_threshold"):
        RegionRule(float("nan"))


def test_map_stats_and_pixel_rules():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 30, 30))
    stats = map_quantile_stats(torch.from_numpy(maps))
    assert stats.shape == (5, len(MAP_QUANTILES))
    np.testing.assert_allclose(stats[:, -1], maps.reshape(5, -1).max(1))
    np.testing.assert_allclose(stats[:, 0], np.median(maps.reshape(5, -1), axis=1))
    assert pixel_threshold_from_stats(stats, "mean-q0.999") == pytest.approx(stats[:, 3].mean())
    # 'max' with 5 images cannot certify 1 %: the largest maximum
    assert pixel_threshold_from_stats(stats, "max") == pytest.approx(stats[:, -1].max())
    with pytest.raises(ConfigError, match="pixel rule"):
        pixel_threshold_from_stats(stats, "mean-q0.3")
    with pytest.raises(ConfigError, match="calibration map stats"):
        pixel_threshold_from_stats(stats[:, :2])


# ---------------------------------------------------------------------------- metrics
def test_pixel_overlap_on_hand_made_masks():
    truth = np.zeros((4, 4), bool)
    truth[0, :2] = True  # 2 pixels
    pred = np.zeros((4, 4), bool)
    pred[0, 1:4] = True  # 3 pixels, 1 shared
    m = pixel_overlap(pred, truth)
    assert m["pixel_iou"] == pytest.approx(1 / 4)
    assert m["pixel_f1"] == pytest.approx(2 / 5)
    assert np.isnan(pixel_overlap(np.zeros((2, 2)), np.zeros((2, 2)))["pixel_iou"])


def test_region_match_iou_rule_and_false_positives():
    truth = np.zeros((2, 10, 10), bool)
    truth[0, 0:2, 0:5] = True  # A: 10 px
    truth[0, 6:9, 6:9] = True  # B: 9 px, missed
    truth[1, 0:4, 0:4] = True  # C: 16 px
    pred = np.zeros_like(truth)
    pred[0, 0:2, 0:3] = True  # IoU with A = 6/10: found
    pred[0, 4, 0] = True  # touches nothing: false positive
    pred[1, 0:4, 0:1] = True  # IoU with C = 4/16 = 0.25 < 0.3: not a match
    m = region_match(pred, truth)
    assert m["n_regions_true"] == 3 and m["n_regions_pred"] == 3
    assert m["region_recall"] == pytest.approx(1 / 3)
    assert m["region_precision"] == pytest.approx(1 / 3)
    assert m["region_f1"] == pytest.approx(1 / 3)
    pred[1, 0:4, 0:2] = True  # IoU 8/16: now found
    m = region_match(pred, truth)
    assert m["region_recall"] == pytest.approx(2 / 3)
    assert m["region_precision"] == pytest.approx(2 / 3)
    # regions never connect across images
    assert region_match(truth, truth)["region_f1"] == 1.0
    assert set(region_metrics(pred, truth)) >= {"pixel_f1", "pixel_iou", "region_f1"}
    with pytest.raises(ValueError, match="differ in shape"):
        region_match(pred[0], truth)


# ---------------------------------------------------------------------------- overlays
def test_low_scores_are_transparent_and_outlines_drawn():
    values = np.array([[0.0, TRANSPARENT_BELOW / 2, TRANSPARENT_BELOW, 1.0]])
    alpha = heatmap_rgba(values)[..., 3]
    assert alpha[0, 0] == alpha[0, 1] == 0 and alpha[0, 2] > 0 and alpha[0, 3] > alpha[0, 2]
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    edge = outline(mask)
    assert edge.sum() == 16 and not edge[2:5, 2:5].any() and edge[1, 1]
    img = np.full((7, 7, 3), 40, np.uint8)
    drawn = draw_outlines(img, mask)
    assert (drawn[edge] == OUTLINE_COLOR).all() and (drawn[~edge] == 40).all()
    over = overlay_rgb(np.full((7, 7, 1), 40, np.uint8), np.zeros((7, 7)), regions=mask)
    assert over.shape == (7, 7, 3) and (over[3, 3] == 40).all()  # transparent heat map
    assert (over[1, 1] == OUTLINE_COLOR).all()
    with pytest.raises(ValueError, match="does not match"):
        draw_outlines(img, mask[:3])


# ---------------------------------------------------------------------------- model file
@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    from flawscope.data.dataset import open_dataset

    data = open_dataset(synthetic_root / "tile")
    inspector = Inspector.train(data, "padim", image_size=64, device="cpu", progress=False,
                                batch_size=8)
    path = inspector.save(tmp_path_factory.mktemp("regions") / "padim.safetensors")
    return inspector, path, data


def test_pixel_threshold_calibrated_saved_and_loaded(trained):
    inspector, path, data = trained
    info = inspector.pixel_threshold_info
    assert info["rule"] == "max" and info["n_good"] == len(data.train)
    # PaDiM's image score is its map maximum: the same quantile of the same numbers
    assert info["value"] == pytest.approx(inspector.threshold.value)
    loaded = Inspector.load(path, device="cpu")
    assert loaded.pixel_threshold == pytest.approx(info["value"])
    preds = loaded.predict(data.test)
    for p in preds:
        assert (len(p.regions) >= 1) == (p.verdict == "defect")
        d = p.to_dict()
        assert d["pixel_threshold"] == pytest.approx(info["value"])
        json.dumps(d)
        for r in d["regions"]:
            assert set(r) == {"bbox", "area_px", "max_score", "peak", "status"}
            x0, y0, x1, y1 = r["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and r["area_px"] > 0


def test_old_model_file_without_pixel_threshold(trained, tmp_path):
    inspector, path, data = trained
    config, tensors = load_model(path, kind=MODEL_KIND)
    del config["pixel_threshold"]
    old = save_model(tmp_path / "old.safetensors", MODEL_KIND, config, tensors)
    loaded = Inspector.load(old, device="cpu")
    assert loaded.pixel_threshold_info is None
    assert loaded.pixel_threshold == loaded.threshold.value
    preds = loaded.predict(data.test)
    assert all((len(p.regions) >= 1) == (p.verdict == "defect") for p in preds)
    assert preds[0].to_dict()["pixel_threshold"] == loaded.threshold.value


def test_recalibration_updates_the_pixel_threshold(trained):
    inspector, path, data = trained
    loaded = Inspector.load(path, device="cpu")
    goods = [s for s in data.test if s.label == 0]
    loaded.calibrate(goods, max_frr=0.1)
    assert loaded.pixel_threshold_info["n_good"] == len(goods)
    assert loaded.pixel_threshold_info["source"] == "held-out goods"


def test_decide_is_the_one_verdict_and_region_rule():
    from flawscope.pipeline import decide

    amap = np.zeros((20, 30))
    amap[5:9, 10:16] = 3.0  # one blob above the pixel threshold 1.0
    rule = RegionRule(1.0, min_region_area=0)
    verdict, regions, mask = decide(2.0, 1.5, amap, rule, (40, 60))
    assert verdict == "defect" and [r.status for r in regions] == ["defect"]
    assert mask.shape == amap.shape and mask.sum() == 24 and mask[5:9, 10:16].all()
    assert regions[0].area_px == 24 * 4  # in original pixels (2x each way)
    # an OK part whose map still crosses the pixel threshold: the same region, to watch
    verdict, regions, mask = decide(1.0, 1.5, amap, rule, (40, 60))
    assert verdict == "ok" and [r.status for r in regions] == ["watch"] and mask.sum() == 24
    # the score alone decides the verdict; without a map there are no regions
    assert decide(1.5, 1.5) == ("ok", [], None)
    assert decide(1.5000001, 1.5)[0] == "defect"
