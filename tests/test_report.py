"""flawscope.report: self-contained HTML report, PNG files and metrics.json."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawscope.data.dataset import Sample
from flawscope.evaluation import EvaluationResult
from flawscope.metrics import image_metrics
from flawscope.report import write_report
from flawscope.report.plots import map_range

SIZE = 32
N_EXAMPLES = 2
EVIL = "<script>alert(1)"  # no slash: it is also a file name


def _samples(root: Path) -> tuple[list[Sample], np.ndarray]:
    """4 good + 4 defect images (gray and RGB), a square defect mask on each defect."""
    rng = np.random.default_rng(0)
    samples, masks = [], []
    specs = [("good", 0)] * 4 + [("scratch", 1)] * 2 + [("hole", 1)] * 2
    for i, (kind, label) in enumerate(specs):
        name = f"{EVIL}{i}.png" if i == 5 else f"{kind}_{i}.png"
        path = root / kind / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (48, 40) if i % 2 else (48, 40, 3)  # other size than the maps: resized
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        mask_path = None
        if label:
            mask[8 + i : 18 + i, 10:20] = True
            mask_path = root / "masks" / f"{i}.png"
            mask_path.parent.mkdir(exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        samples.append(Sample(path, label, kind, mask_path=mask_path))
        masks.append(mask)
    return samples, np.stack(masks)


def _result(name: str, samples: list[Sample], masks: np.ndarray, seed: int,
            with_maps: bool = True) -> EvaluationResult:
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    scores = rng.normal(0, 1, labels.size) + 1.5 * labels
    threshold = 0.8
    maps = rng.random((labels.size, SIZE, SIZE)).astype(np.float32)
    maps[masks] += 2.0
    metrics = image_metrics(labels, scores, threshold)
    metrics["images_per_second"] = 123.4 + seed
    info = {
        "model": name,
        "fit_seconds": 10.0 + seed,
        "data": {"root": "/data/bottle", "format": "mvtec", "classes": ["bottle"]},
        "threshold": {"value": threshold, "rule": "good-quantile", "max_frr": 0.01,
                      "frr_calibration": 0.0093, "n_good": 431, "certified": True},
    }
    return EvaluationResult(name, samples, scores, threshold, metrics,
                            maps if with_maps else None, masks, info)


def _n_examples(r: EvaluationResult, n: int) -> int:
    """Overlay cards the report shows: real misses / false alarms (at most ``n`` each), or
    the ``n`` closest calls of a kind that has none, and the highest-scoring caught defects."""
    y, s = r.labels, np.asarray(r.scores)
    missed = int(np.sum(s[y == 1] <= r.threshold))
    alarms = int(np.sum(s[y == 0] > r.threshold))
    caught = int(np.sum(s[y == 1] > r.threshold))
    return (min(n, missed or int((y == 1).sum()))
            + min(n, alarms or int((y == 0).sum())) + min(n, caught))


def _decoded_pngs(html: str) -> list[Image.Image]:
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]


def _check_self_contained(html: str) -> None:
    assert "<script" not in html.lower()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "url(" not in html and "@import" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for tag in ("section", "div", "table", "figure"):  # every element opened is closed
        assert html.count(f"<{tag}") == html.count(f"</{tag}>"), tag


def test_single_model_report(tmp_path: Path) -> None:
    samples, masks = _samples(tmp_path / "data")
    res = _result("ncae", samples, masks, seed=1)
    out = tmp_path / "report"
    path = write_report(out, [res], title=f"QA {EVIL}", n_examples=N_EXAMPLES)

    assert path == out / "report.html"
    html = path.read_text(encoding="utf-8")
    _check_self_contained(html)
    assert EVIL not in html and "&lt;script&gt;" in html
    assert f"{res.metrics['image_auroc']:.3f}" in html
    assert f"{res.metrics['false_reject_rate']:.2%}" in html
    assert "at most 1.00% of good parts rejected" in html and "431 good images" in html
    assert "pixel AUROC" not in html  # not in the metrics: no row

    files = {p.name for p in out.iterdir()}
    examples = sorted(f for f in files if f.startswith("examples_ncae_"))
    n_cards = _n_examples(res, N_EXAMPLES)
    assert len(examples) == n_cards >= 2
    assert {"report.html", "metrics.json", "roc.png", "pr.png", "recall_frr.png",
            "hist_ncae.png"} <= files
    assert not any(f.endswith(".tmp") for f in files)
    # roc + pr + recall vs false-reject rate + histogram + overlays, all decodable
    images = _decoded_pngs(html)
    assert len(images) == 4 + n_cards
    for img in images:
        img.load()
        assert img.size[0] > 200 and img.size[1] > 200
    for f in files - {"report.html", "metrics.json"}:
        with Image.open(out / f) as img:
            img.load()
            assert img.format == "PNG"

    data = json.loads((out / "metrics.json").read_text())
    assert data["models"]["ncae"]["metrics"] == res.metrics
    assert data["models"]["ncae"]["per_type"] == res.per_type()
    assert data["models"]["ncae"]["threshold"]["n_good"] == 431


def test_two_models_side_by_side(tmp_path: Path) -> None:
    samples, masks = _samples(tmp_path / "data")
    a = _result("ncae", samples, masks, seed=1)
    b = _result("patchcore", samples, masks, seed=2)
    b.metrics.update(pixel_auroc=0.987, aupro=0.912)
    out = tmp_path / "cmp"
    html = write_report(out, [a, b], n_examples=N_EXAMPLES).read_text(encoding="utf-8")
    _check_self_contained(html)

    assert "ncae" in html and "patchcore" in html
    assert "<th>ncae</th><th>patchcore</th>" in html
    assert "0.987" in html and "0.912" in html and "AUPRO" in html
    for r in (a, b):
        assert f"{r.metrics['image_auroc']:.3f}" in html
    # images/s: patchcore (125.4) best; fit seconds: ncae (11.0) best
    assert '<td class="best">125.4</td>' in html and '<td class="best">11.0</td>' in html
    for name, r in (("ncae", a), ("patchcore", b)):
        assert len(list(out.glob(f"examples_{name}_*.png"))) == _n_examples(r, N_EXAMPLES)
        assert (out / f"hist_{name}.png").is_file()
    assert len(_decoded_pngs(html)) == 3 + 2 + sum(_n_examples(r, N_EXAMPLES) for r in (a, b))
    data = json.loads((out / "metrics.json").read_text())
    assert data["models"]["patchcore"]["metrics"] == b.metrics
    assert set(data["models"]) == {"ncae", "patchcore"}


def test_worst_examples_are_lowest_defects_and_highest_goods(tmp_path: Path) -> None:
    samples, masks = _samples(tmp_path / "data")
    res = _result("m", samples, masks, seed=3)
    res.scores = np.array([0.1, 5.0, 0.2, 0.3, 4.0, 6.0, -1.0, 7.0])
    html = write_report(tmp_path / "r", [res], n_examples=1).read_text(encoding="utf-8")
    assert "good_1.png — good" in html  # highest good (5.0): false alarm
    assert "False alarms (1 good part flagged, highest scores first)" in html  # singular
    assert "hole_6.png — hole" in html  # lowest defect (-1.0): miss
    # the highest-scoring caught defect (7.0) has its own group; the rest are not shown
    caught = html.split("Caught defects (3 of 4, highest scores first)")[1]
    assert "hole_7.png — hole" in caught
    assert "good_0.png" not in html and "hole_5.png" not in html


def test_no_maps_and_missing_image(tmp_path: Path) -> None:
    samples, masks = _samples(tmp_path / "data")
    res = _result("nomaps", samples, masks, seed=1, with_maps=False)
    html = write_report(tmp_path / "a", [res]).read_text(encoding="utf-8")
    assert "overlays skipped" in html
    assert not list((tmp_path / "a").glob("examples_*"))

    res = _result("m", samples, masks, seed=1)
    for s in samples:  # images that moved away must not break the report
        s.path.unlink()
    write_report(tmp_path / "b", [res], n_examples=1)
    assert len(list((tmp_path / "b").glob("examples_m_*.png"))) == _n_examples(res, 1)


def test_nan_metrics_are_strict_json(tmp_path: Path) -> None:
    samples, masks = _samples(tmp_path / "data")
    res = _result("m", samples, masks, seed=1)
    res.metrics["aupro"] = float("nan")
    write_report(tmp_path / "r", [res], n_examples=0)
    text = (tmp_path / "r" / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["models"]["m"]["metrics"]["aupro"] is None


def test_example_cards_have_the_service_look(tmp_path: Path) -> None:
    """A report card is the image beside the service's overlay (flawscope.heatmap: turbo,
    the threshold at the middle of the scale), ground truth outlined white, regions magenta,
    captioned with the decided verdict."""
    from flawscope.data.images import read_image
    from flawscope.heatmap import OUTLINE_COLOR, TRUTH_COLOR, sample_panel_rgb, scale_map
    from flawscope.threshold import ScoreNormalization

    samples, masks = _samples(tmp_path / "data")
    res = _result("m", samples, masks, seed=1)
    res.map_scale, res.normalization = "score", ScoreNormalization(low=0.0, threshold=1.0)
    res.region_masks = np.roll(masks, 2, axis=2)  # predicted regions beside the truth
    write_report(tmp_path / "r", [res], n_examples=1)
    s, y = np.asarray(res.scores), res.labels
    caught = np.flatnonzero((y == 1) & res.defect_flags())
    i = int(caught[np.argmax(s[caught])])
    got = np.asarray(Image.open(tmp_path / "r" / "examples_m_caught_01.png").convert("RGB"))
    want = sample_panel_rgb(
        read_image(samples[i].path, size=(SIZE, SIZE)),
        scale_map(res.maps[i], "score", res.normalization), verdict="defect",
        score=float(s[i]), threshold=res.threshold,
        name=f"{samples[i].defect_type}/{samples[i].path.name}", scale="score",
        regions=res.region_masks[i], truth=masks[i])
    np.testing.assert_array_equal(got, want)
    colours = {tuple(c) for c in got.reshape(-1, 3)}
    assert OUTLINE_COLOR in colours and TRUTH_COLOR in colours


def test_map_range_ignores_outliers() -> None:
    maps = np.zeros((2, 100, 100))
    maps[0, 0, 0] = 1e6
    maps[1] = np.linspace(0, 1, 10_000).reshape(100, 100)
    lo, hi = map_range(maps)
    assert lo == 0.0 and hi < 2.0


def test_empty_results_rejected(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no evaluation results"):
        write_report(tmp_path, [])


@pytest.mark.slow  # a whole fit + evaluate + report workflow
def test_residual_statistics_section_from_given_statistics(tmp_path: Path) -> None:
    """Autoencoder results: one strip plot per statistic, best AUROC first, the threshold
    line on the score rule's plot, triplets of the kept reconstructions, AUROCs in JSON."""
    from flawscope.residual import STATISTICS

    samples, masks = _samples(tmp_path / "data")
    res = _result("ncae", samples, masks, seed=1)
    y = res.labels
    rng = np.random.default_rng(5)
    res.statistics = {name: rng.normal(size=y.size) + k * 0.3 * y
                      for k, name in enumerate(STATISTICS)}
    res.statistics["min"] = -np.abs(res.statistics["min"]) - 2.0 * y  # lower = abnormal
    res.score_rule = "min"
    res.scores = -res.statistics["min"]
    image = rng.random((SIZE, SIZE, 1)).astype(np.float32)
    res.reconstructions = {4: (image, image * 0.5), 0: (image, image)}
    out = tmp_path / "r"
    html = write_report(out, [res], n_examples=0).read_text(encoding="utf-8")
    _check_self_contained(html)
    aurocs = res.statistics_auroc()
    assert aurocs["min"] == 1.0 and list(aurocs)[0] == "min"
    shown = re.findall(r"<figcaption>(\w+): image AUROC ([0-9.]+)", html)
    assert shown == [(k, f"{v:.3f}") for k, v in aurocs.items()]
    assert "min: image AUROC 1.000 (the model&#x27;s score rule" in html
    assert sorted(p.name for p in out.glob("statistic_ncae_*.png")) == sorted(
        f"statistic_ncae_{n}.png" for n in STATISTICS)
    assert sorted(p.name for p in out.glob("residual_ncae_*.png")) == [
        "residual_ncae_01.png", "residual_ncae_02.png"]
    data = json.loads((out / "metrics.json").read_text())
    assert data["models"]["ncae"]["residual_statistics_auroc"] == pytest.approx(aurocs)
