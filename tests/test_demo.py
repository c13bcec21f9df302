"""The demo workflow end to end (small sizes): data, fit, evaluate, side-by-side report."""

from __future__ import annotations

import json

from flawscope.demo import DEMO_OPTIONS, run_demo


def test_demo_writes_side_by_side_report(tmp_path):
    tiny = {
        "ncae": {"image_size": 32, "epochs": 2, "widths": [8, 16], "latent_channels": 8},
        "patchcore": {"image_size": 64, "coreset_ratio": 0.1},
    }
    data = {"n_train": 30, "n_test_good": 6, "n_test_per_defect": 2, "image_size": 64}
    reports = run_demo(tmp_path, models=["ncae", "patchcore"], categories=("washer",),
                       device="cpu", progress=False, options=tiny, data=data)
    assert reports == [tmp_path / "report" / "washer" / "report.html"]
    html = reports[0].read_text()
    assert "ncae" in html and "patchcore" in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"washer/ncae", "washer/patchcore"}
    assert all(0 <= v["image_auroc"] <= 1 for v in summary.values())
    assert (tmp_path / "models" / "washer-patchcore.safetensors").exists()
    # the default demo compares NCAE with PatchCore
    assert {"ncae", "patchcore"} <= set(DEMO_OPTIONS)
