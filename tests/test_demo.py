"""The demo workflow end to end (small sizes): data, fit, evaluate, reports, next steps."""

from __future__ import annotations

import json
import shlex

import pytest

from flawscope import demo
from flawscope.cli import main
from flawscope.demo import run_demo
from flawscope.pipeline import DEFAULT_MODEL, Inspector

pytestmark = pytest.mark.slow  # the whole demo workflow, twice

TINY_DATA = {"n_train": 30, "n_test_good": 6, "n_test_per_defect": 2, "image_size": 64}
TINY_OPTIONS = {
    "ncae": {"image_size": 32, "epochs": 2, "widths": [8, 16], "latent_channels": 8},
    "patchcore": {"image_size": 64, "coreset_ratio": 0.1},
}


def test_demo_writes_side_by_side_report(tmp_path):
    result = run_demo(tmp_path, models=["ncae", "patchcore"], categories=("washer",),
                      device="cpu", progress=False, options=TINY_OPTIONS, data=TINY_DATA)
    assert result.reports == [tmp_path / "report" / "washer" / "report.html"]
    html = result.reports[0].read_text()
    assert "ncae" in html and "patchcore" in html
    summary = json.loads(result.summary.read_text())
    assert set(summary) == {"washer/ncae", "washer/patchcore"}
    assert all(0 <= v["image_auroc"] <= 1 for v in summary.values())
    assert result.models == [tmp_path / "models" / "washer-ncae.safetensors",
                             tmp_path / "models" / "washer-patchcore.safetensors"]
    assert all(m.exists() for m in result.models)


def test_demo_command_fits_the_default_detector_and_says_what_to_do_next(
        tmp_path, monkeypatch, capsys):
    """``flawscope demo`` (what ``make demo`` runs): one fast default detector per category,
    then the paths it wrote and a serve command that names a real model file."""
    monkeypatch.setattr(demo, "DEMO_DATA", TINY_DATA)
    monkeypatch.setattr(demo, "DEMO_OPTIONS", TINY_OPTIONS)
    assert main(["demo", "-o", str(tmp_path), "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    expected = [tmp_path / "models" / f"{cat}-{DEFAULT_MODEL}.safetensors"
                for cat in ("tile", "washer")]
    assert sorted((tmp_path / "models").iterdir()) == expected  # no NCAE fit by default
    for path in [*expected, *(tmp_path / "report" / c / "report.html" for c in ("tile", "washer")),
                 tmp_path / "summary.json"]:
        assert f"  {path}\n" in out or f"metrics: {path}\n" in out
        assert path.exists()
    commands = [shlex.split(line) for line in out.splitlines()
                if line.startswith("  flawscope ")]
    assert [c[:2] for c in commands] == [["flawscope", "serve"], ["flawscope", "predict"]]
    (_, _, model), (_, _, predicted, images) = commands
    assert Inspector.load(model, device="cpu").info["model"] == DEFAULT_MODEL
    assert predicted == model and (tmp_path / "data" / "washer" / "test").samefile(images)


def test_demo_rejects_unknown_detectors_before_any_work(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--models", "patchcore,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()

