"""NCAE and conv-AE detectors: training, determinism, resume, score rules, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flawscope.data.dataset import open_dataset
from flawscope.errors import ConfigError, FlawscopeError
from flawscope.models import create
from flawscope.models.autoencoder import NCAE, AutoencoderNet
from flawscope.nn import NeighborConv2d

TINY = {"image_size": 32, "widths": [8, 16], "latent_channels": 8, "batch_size": 8,
        "progress": False, "device": "cpu"}


def weights(det) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in det.net_.state_dict().items()}


def test_ncae_uses_neighbor_convs_and_conv_ae_does_not():
    ncae = AutoencoderNet(1, [8, 16], 4, neighbor=True)
    plain = AutoencoderNet(1, [8, 16], 4, neighbor=False)
    assert any(isinstance(m, NeighborConv2d) for m in ncae.modules())
    assert not any(isinstance(m, NeighborConv2d) for m in plain.modules())
    assert [type(m).__name__ for m in plain.modules() if not isinstance(m, NeighborConv2d)]


def test_fit_is_seeded_and_reproducible(tile):
    a = create("ncae", epochs=2, seed=3, **TINY).fit(tile.train[:12])
    b = create("ncae", epochs=2, seed=3, **TINY).fit(tile.train[:12])
    c = create("ncae", epochs=2, seed=4, **TINY).fit(tile.train[:12])
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert a.channels_ == 1  # the tile images are gray
    assert len(a.history_) == 2 and a.is_fitted


def test_resume_after_interruption_matches_uninterrupted_run(tile, tmp_path, monkeypatch):
    full = create("ncae", epochs=4, seed=0, **TINY).fit(
        tile.train[:12], validation=tile.train[12:16])
    ckpt = tmp_path / "run.ckpt"
    original = NCAE._train_epoch
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("test interrupt")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NCAE, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt, match="test interrupt"):
        create("ncae", epochs=4, seed=0, **TINY).fit(
            tile.train[:12], validation=tile.train[12:16], checkpoint=ckpt)
    assert ckpt.exists()
    monkeypatch.setattr(NCAE, "_train_epoch", original)
    resumed = create("ncae", epochs=4, seed=0, **TINY).fit(
        tile.train[:12], validation=tile.train[12:16], checkpoint=ckpt, resume=True)
    assert resumed.resumed_from_epoch_ == 2
    wf, wr = weights(full), weights(resumed)
    for k in wf:
        torch.testing.assert_close(wr[k], wf[k], rtol=1e-5, atol=1e-6)
    assert [h["epoch"] for h in resumed.history_] == [0, 1, 2, 3]
    assert resumed.best_epoch_ == full.best_epoch_
    np.testing.assert_allclose([h["val_loss"] for h in resumed.history_],
                               [h["val_loss"] for h in full.history_], rtol=1e-5)


def test_resume_refuses_checkpoint_of_other_run(tile, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    create("ncae", epochs=1, **TINY).fit(tile.train[:8], checkpoint=ckpt)
    with pytest.raises(FlawscopeError, match="different training configuration"):
        create("ncae", epochs=1, **{**TINY, "latent_channels": 4}).fit(
            tile.train[:8], checkpoint=ckpt, resume=True)


def test_score_rules_and_maps(tile):
    det = create("ncae", epochs=1, **TINY).fit(tile.train[:8])
    test = tile.test[:6]
    s_map, maps = det.score(test)
    assert s_map.shape == (6,) and maps.shape == (6, 32, 32)
    np.testing.assert_allclose(s_map, maps.reshape(6, -1).max(1), rtol=1e-6)
    stats = det.residual_statistics(test)
    det.score_rule = "mse"
    np.testing.assert_allclose(det.decision_function(test), stats[:, -1], rtol=1e-5)
    det.score_rule = "min"  # lower min = more abnormal, so it is negated
    np.testing.assert_allclose(det.decision_function(test), -stats[:, 6], rtol=1e-5)


def test_learned_rule_needs_defects_and_learns(tile):
    with pytest.raises(ConfigError, match="needs labelled defect"):
        create("ncae", epochs=1, score_rule="learned", **TINY).fit(tile.train[:8])
    defects = [s for s in tile.test if s.is_defect]
    det = create("ncae", epochs=1, score_rule="learned", **TINY).fit(
        tile.train[:8], defects=defects)
    scores = det.decision_function(tile.train[:8] + defects)
    # a logistic regression on its own training data separates better than chance
    assert scores[8:].mean() > scores[:8].mean()


def test_bad_options():
    with pytest.raises(ConfigError, match="score_rule"):
        create("ncae", score_rule="nonsense")
    with pytest.raises(ConfigError, match="unknown option"):
        create("ncae", coreset_ratio=0.1)


@pytest.mark.parametrize("size", [(30, 30), (13, 7), (3, 5)])
def test_any_input_size_is_padded_and_cropped_back(size):
    net = AutoencoderNet(1, [4, 4, 4], 4, neighbor=True).eval()  # down-samples by 4
    x = torch.rand(2, 1, *size)
    assert net(x).shape == x.shape
    # the crop keeps the input's own pixels: reflect padding, split between the sides
    h, w = size
    ph, pw = -h % 4, -w % 4
    if ph < h and pw < w:
        pad = torch.nn.functional.pad(
            x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
        full = net.decoder(net.encoder(pad))
        torch.testing.assert_close(net(x), full[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w])


def test_image_size_that_is_no_multiple_fits_and_scores(tile):
    """The design documents' casting setting: 300 px, 1 channel, default widths (16x)."""
    det = create("ncae", epochs=1, image_size=300, channels=1, latent_channels=8,
                 batch_size=4, progress=False, device="cpu").fit(tile.train[:4])
    scores, maps = det.score(tile.test[:2])
    assert maps.shape == (2, 300, 300) and np.isfinite(scores).all()


def test_rgb_input_and_gray_to_rgb_model(synthetic_root):
    washer = open_dataset(synthetic_root / "washer")
    det = create("conv-ae", epochs=1, **TINY).fit(washer.train[:8])
    assert det.channels_ == 3
    tile = open_dataset(synthetic_root / "tile")
    s, _ = det.score(tile.test[:2])  # gray images given to an RGB model
    assert np.isfinite(s).all()
