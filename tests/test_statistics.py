"""Residual statistics of the autoencoders: evaluation, ``evaluate --statistics`` and the
report's "Residual statistics" section (design document 001's threshold method)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest

from flawscope.cli import main
from flawscope.data.dataset import Sample
from flawscope.evaluation import EvaluationResult, evaluate, residual_examples
from flawscope.pipeline import Inspector
from flawscope.report import write_report
from flawscope.residual import STATISTICS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"image_size": 32, "widths": [8, 16], "latent_channels": 8, "epochs": 2,
        "batch_size": 8, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def ncae(tile, tmp_path_factory) -> tuple[Inspector, Path]:
    inspector = Inspector.train(tile, "ncae", score_rule="std", **TINY)
    path = inspector.save(tmp_path_factory.mktemp("stats") / "ncae.safetensors")
    return inspector, path


@pytest.fixture(scope="module")
def result(ncae, tile) -> EvaluationResult:
    return evaluate(ncae[0], tile)


def test_evaluate_keeps_every_statistic(result, ncae, tile):
    inspector = ncae[0]
    n = len(tile.test)
    assert result.score_rule == "std"
    assert list(result.statistics) == list(STATISTICS)
    for name, values in result.statistics.items():
        assert values.shape == (n,) and np.isfinite(values).all(), name
    # one pass gives the same scores as the model's own scoring, and the same statistics
    scores, _ = inspector.score(tile.test, with_maps=False)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-6)
    np.testing.assert_allclose(result.scores, result.statistics["std"], rtol=1e-6)
    direct = inspector.detector.residual_statistics(tile.test)
    np.testing.assert_allclose(np.stack(list(result.statistics.values()), 1), direct,
                               rtol=1e-5, atol=1e-7)


def test_reconstructions_are_the_residuals_of_the_statistics(result):
    labels = result.labels
    assert sorted(result.reconstructions) == sorted(residual_examples(labels, result.scores))
    for i, (image, recon) in result.reconstructions.items():
        assert image.shape == recon.shape == (32, 32, 1)
        assert recon.min() >= 0.0 and recon.max() <= 1.0
        residual = image.astype(np.float64) - recon
        assert residual.mean() == pytest.approx(result.statistics["mean"][i], abs=1e-5)
        assert residual.max() == pytest.approx(result.statistics["max"][i], abs=1e-5)


def test_residual_examples_picks_extremes():
    labels = np.array([0, 1, 1, 0, 1, 1, 1])
    scores = np.array([0.9, 0.5, 3.0, 0.1, 0.2, 2.0, 1.0])
    assert residual_examples(labels, scores) == [2, 5, 4, 1, 0]
    assert residual_examples(np.array([1, 0]), np.array([1.0, 0.0])) == [0, 1]  # no repeats
    assert residual_examples(np.array([0, 0]), np.array([1.0, 2.0])) == [1]


def test_statistics_auroc_orientation_and_order(tmp_path):
    samples = [Sample(tmp_path / f"{i}.png", lab, "good" if lab == 0 else "hole")
               for i, lab in enumerate([0, 0, 0, 1, 1, 1])]
    labels = np.array([s.label for s in samples])
    stats = {name: np.zeros(6) + np.arange(6) * 0.01 for name in STATISTICS}
    stats["min"] = -1.0 * labels + 0.01 * np.arange(6)  # lower for defects: perfect when negated
    stats["mse"] = np.array([0.3, 0.1, 0.2, 0.25, 0.15, 0.35])  # partly mixed
    r = EvaluationResult("ncae", samples, labels.astype(float), 0.5, {}, statistics=stats)
    auc = r.statistics_auroc()
    assert auc["min"] == 1.0 and auc["mse"] == pytest.approx(6 / 9)
    assert list(auc)[-1] == "mse" and list(auc.values()) == sorted(auc.values(), reverse=True)
    rows = r.statistics_rows()
    assert len(rows) == 6 and float(rows[3]["min"]) == stats["min"][3]


@pytest.mark.slow  # a whole fit + evaluate + report workflow
def test_report_has_residual_section(result, tmp_path):
    html = write_report(tmp_path, [result], n_examples=1).read_text()
    found = re.search(r'<section id="residuals-ncae"><h3>Residual statistics</h3>(.*?)'
                      "</section>", html, re.S)
    assert found, "no Residual statistics section"
    section = found.group(1)
    for name, auc in result.statistics_auroc().items():
        assert (tmp_path / f"statistic_ncae_{name}.png").stat().st_size > 0
        assert f"{name}: image AUROC {auc:.3f}" in section
    assert "the model&#x27;s score rule" in section  # std: threshold line drawn there
    assert section.count('<img src="data:image/png') == len(STATISTICS) + len(
        result.reconstructions)
    triplets = sorted(tmp_path.glob("residual_ncae_*.png"))
    assert len(triplets) == len(result.reconstructions) >= 2
    assert len(list(tmp_path.glob("statistic_*.png"))) == len(STATISTICS)
    # best statistic first
    shown = re.findall(r"<figcaption>(\w+): image AUROC", section)
    assert shown == list(result.statistics_auroc())


def test_report_without_statistics_has_no_section(result, tmp_path):
    plain = EvaluationResult("patchcore", result.samples, result.scores, result.threshold,
                             result.metrics)
    html = write_report(tmp_path, [plain], n_examples=0).read_text()
    assert "Residual statistics" not in html
    assert not list(tmp_path.glob("statistic_*.png"))


def test_cli_statistics_csv(ncae, synthetic_root, tmp_path, capsys):
    out = tmp_path / "stats.csv"
    assert main(["evaluate", str(ncae[1]), str(synthetic_root / "tile"), "--statistics",
                 str(out), "--device", "cpu", "--json"]) == 0
    assert "residual statistics written to" in capsys.readouterr().err
    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames
    assert columns == ["path", "label", "defect_type", "score", *STATISTICS]
    n_test = len(list((synthetic_root / "tile" / "test").rglob("*.png")))
    assert len(rows) == n_test
    for row in rows:
        assert row["label"] in {"0", "1"}
        assert (row["defect_type"] == "good") == (row["label"] == "0")
        for name in STATISTICS:
            assert math.isfinite(float(row[name])), (row["path"], name)
        assert float(row["score"]) == pytest.approx(float(row["std"]), rel=1e-5)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


@pytest.fixture(scope="module")
def patchcore_model(tile, tmp_path_factory):
    inspector = Inspector.train(tile, "patchcore", image_size=32, coreset_ratio=0.1,
                                calibration_images=None, device="cpu", progress=False,
                                batch_size=8)
    return inspector.save(tmp_path_factory.mktemp("pc") / "patchcore.safetensors")


def test_cli_statistics_refused_for_patchcore(patchcore_model, synthetic_root, tmp_path, capsys):
    out = tmp_path / "stats.csv"
    code = main(["evaluate", str(patchcore_model), str(synthetic_root / "tile"),
                 "--statistics", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "'patchcore'" in err and "--statistics" in err and "ncae" in err
    assert not out.exists()
