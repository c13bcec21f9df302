"""flawscope.classify.augment: the policy as data, per-class flip exclusions, exact geometry."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from flawscope.classify.augment import AugmentPolicy, apply_affine
from flawscope.errors import ConfigError


def test_defaults_are_the_seed_and_round_trip(tmp_path) -> None:
    p = AugmentPolicy()
    assert (p.affine_degrees, p.rotation, p.hflip, p.vflip) == (45.0, (0.0, 80.0), 0.5, 0.5)
    assert p.no_flip_classes == ("metal_nut",)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({**p.to_dict(), "no_flip_classes": ["metal_nut", "screw"]}))
    q = AugmentPolicy.from_file(path)
    assert q.no_flip_classes == ("metal_nut", "screw") and q.rotation == (0.0, 80.0)
    assert AugmentPolicy.from_dict(q.to_dict()) == q
    assert p.with_flip_policy("none").flip_policy_name() == "none"
    assert p.with_flip_policy("all").flip_policy_name() == "all"
    assert p.flip_policy_name() == "except metal_nut"


@pytest.mark.parametrize(
    ("d", "match"),
    [({"flips": 1}, "unknown key.*flips"), ({"hflip": 2}, "hflip=2.0: a probability"),
     ({"rotation": [10, 0]}, "min is larger"), ({"scale": "big"}, "expected a number")],
)
def test_bad_policy_is_named(d, match) -> None:
    with pytest.raises(ConfigError, match=match):
        AugmentPolicy.from_dict(d)


def test_missing_policy_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        AugmentPolicy.from_file(tmp_path / "none.json")


def test_geometry_matches_torchvision() -> None:
    x = torch.rand(4, 3, 8, 8)
    params = torch.tensor([
        [90.0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 1], [0, 0, 1, 0, 0, 1], [0, 0, 0, 0.25, 0, 1],
    ])
    y = apply_affine(x, params)
    torch.testing.assert_close(y[0], TF.rotate(x[0], 90.0))  # counter-clockwise, like torchvision
    torch.testing.assert_close(y[1], x[1].flip(-1))
    torch.testing.assert_close(y[2], x[2].flip(-2))
    torch.testing.assert_close(y[3, :, :, 2:], x[3, :, :, :-2])  # shifted 2 px to the right
    assert y[3, :, :, :2].abs().max() == 0  # zero fill (the mean after normalisation)
    # 30 degrees: same as torchvision's bilinear rotation away from the border
    r = apply_affine(x[:1], torch.tensor([[30.0, 0, 0, 0, 0, 1]]))
    ref = TF.rotate(x[0], 30.0, interpolation=TF.InterpolationMode.BILINEAR)
    torch.testing.assert_close(r[0, :, 3:5, 3:5], ref[:, 3:5, 3:5], atol=1e-5, rtol=0)


def test_excluded_classes_are_never_flipped() -> None:
    p = AugmentPolicy(affine_degrees=0, rotation=(0, 0), hflip=1.0, vflip=0.0,
                      no_flip_classes=("metal_nut",))
    ok = p.flip_allowed(["metal_nut", "cable", "screw"], ["metal_nut-good", "cable-good",
                                                          "screw-good"])
    assert ok.tolist() == [False, True, True]
    x = torch.rand(3, 3, 6, 6)
    params = p.sample(3, torch.Generator().manual_seed(0))
    y = p.apply(x, params, torch.from_numpy(ok))
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y[1:], x[1:].flip(-1))
    # a full label can be excluded too
    assert AugmentPolicy(no_flip_classes=("cable-good",)).flip_allowed(
        ["cable"], ["cable-good"]).tolist() == [False]


def test_sampling_is_reproducible_and_in_range() -> None:
    p = AugmentPolicy(translate=0.1, scale=(0.9, 1.1))
    a = p.sample(1000, torch.Generator().manual_seed(3))
    b = p.sample(1000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert a[:, 0].min() >= -45 and a[:, 0].max() <= 125  # +-45 plus 0..80
    assert 0.4 < a[:, 1].mean() < 0.6 and a[:, 3].abs().max() <= 0.1
    assert a[:, 5].min() >= 0.9 and a[:, 5].max() <= 1.1
    x = torch.rand(2, 1, 5, 5)
    off = AugmentPolicy(enabled=False)
    assert off.is_identity and off.apply(x, a[:2]) is x


def test_quarter_turns_and_presets(tmp_path) -> None:
    p = AugmentPolicy.from_spec("dihedral")
    assert p.rot90 and p.affine_degrees == 0 and p.rotation == (0.0, 0.0)
    params = p.sample(4000, torch.Generator().manual_seed(1))
    assert set(params[:, 0].tolist()) == {0.0, 90.0, 180.0, 270.0}
    x = torch.rand(1, 3, 8, 8)
    turned = apply_affine(x, torch.tensor([[270.0, 0, 0, 0, 0, 1]]))
    torch.testing.assert_close(turned[0], torch.rot90(x[0], 3, (1, 2)))  # lossless
    assert AugmentPolicy.from_spec("none").is_identity
    flips = AugmentPolicy.from_spec("flips").sample(4000, torch.Generator().manual_seed(1))
    assert set(flips[:, 0].tolist()) == {0.0}  # the part keeps its orientation
    assert 0.45 < float(flips[:, 1].mean()) < 0.55 and 0.45 < float(flips[:, 2].mean()) < 0.55
    assert AugmentPolicy.from_spec("document") == AugmentPolicy()
    with pytest.warns(FutureWarning, match="--augment seed is deprecated.*--augment document"):
        assert AugmentPolicy.from_spec("seed") == AugmentPolicy()
    path = tmp_path / "p.json"
    path.write_text('{"rot90": true, "rotation": [0, 0], "affine_degrees": 0}')
    assert AugmentPolicy.from_spec(path).rot90
