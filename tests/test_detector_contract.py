"""The detector contract, explicit on ``Detector``: parameters, what a detector declares."""

from __future__ import annotations

import pytest

from flawscope.errors import ConfigError
from flawscope.models import create, list_models
from flawscope.pipeline import detector_uses_defects
from flawscope.runtime import map_scale


@pytest.mark.parametrize("name", list_models())
def test_every_detector_keeps_the_contract(name):
    det = create(name)
    params = det.get_params()
    assert set(params) == set(type(det).param_names())
    assert det.set_params(seed=7) is det and det.get_params()["seed"] == 7
    with pytest.raises(ConfigError, match="no_such_option"):
        det.set_params(no_such_option=1)
    assert isinstance(det.learns_from_defects, bool) and isinstance(det.score_is_map_max, bool)
    assert isinstance(det.self_calibrating, bool)


def test_score_rule_decides_defects_and_heatmap_scale():
    learned = create("ncae", score_rule="learned")
    plain = create("ncae")
    assert detector_uses_defects(learned) and not detector_uses_defects(plain)
    assert map_scale(plain) == "score" and map_scale(learned) == "image"
    assert map_scale(create("patchcore")) == "score"
    assert create("patchcore").self_calibrating and not plain.self_calibrating
