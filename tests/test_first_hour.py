"""The first hour of a new user: the operating-point table of ``evaluate``, ``calibrate
--max-frr`` without images, errors before the heavy imports, ``flawscope models`` in user
words."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flawscope.cli import main
from flawscope.data.synthetic import generate_dataset

TINY = ["--image-size", "32", "--epochs", "2", "--device", "cpu", "--quiet",
        "--param", "widths=[8,16]", "--param", "latent_channels=8", "--param", "batch_size=8"]


@pytest.fixture(scope="module")
def tile(tmp_path_factory) -> Path:
    """Enough good training images that about 45 are held out for calibration: the 5 % target
    is certified, the stricter ones are not, so the table's thresholds differ."""
    root = generate_dataset(tmp_path_factory.mktemp("first-hour") / "data", ["tile"],
                            n_train=300, n_test_good=16, n_test_per_defect=4, image_size=64,
                            seed=1)
    return root / "tile"


@pytest.fixture(scope="module")
def model(tile, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first-hour-model") / "tile.safetensors"
    assert main(["fit", str(tile), "--model", "ncae", "-o", str(out), *TINY]) == 0
    return out


def _per_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return (np.array([float(r["score"]) for r in rows]),
            np.array([int(r["label"]) for r in rows]))


def _table_rows(out: str) -> dict[str, list[str]]:
    """The operating-point table of ``evaluate``'s text output: target label -> cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("false-reject target"))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith(("*", "recommendation")):
            break
        *label, threshold, recall, frr = line.split()
        rows[" ".join(label)] = [threshold, recall, frr]
    return rows


def test_evaluate_operating_points_match_per_image_recomputation(model, tile, tmp_path,
                                                                  capsys):
    from flawscope.operating import FRR_TARGETS
    from flawscope.pipeline import Inspector
    from flawscope.threshold import calibrate_good_quantile

    table = tmp_path / "per-image.csv"
    report = tmp_path / "report"
    assert main(["evaluate", str(model), str(tile), "--json", "--per-image", str(table),
                 "--report", str(report), "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    op = m["operating_points"]
    scores, labels = _per_image(table)
    calibration = Inspector.load(model).calibration_scores
    assert calibration is not None and len(calibration) >= 39
    assert [p["max_frr"] for p in op["points"]] == list(FRR_TARGETS)
    assert op["model_max_frr"] == 0.01
    for p in op["points"]:
        # the threshold is what calibrate --max-frr would set from the stored good scores
        assert p["threshold"] == calibrate_good_quantile(calibration, p["max_frr"]).value
        flagged = scores > p["threshold"]
        assert p["recall"] == pytest.approx(flagged[labels == 1].mean())
        assert p["frr_test"] == pytest.approx(flagged[labels == 0].mean())
    by = {p["max_frr"]: p for p in op["points"]}
    assert by[0.05]["certified"] and not by[0.001]["certified"]
    assert by[0.05]["threshold"] < by[0.001]["threshold"]  # looser target: lower bar
    f1 = op["f1_optimal"]
    assert f1["recall"] == pytest.approx((scores[labels == 1] > f1["threshold"]).mean())
    # the model's own point is the one the metrics report
    assert m["recall"] == pytest.approx(by[0.01]["recall"])

    # the text table says the same, rounded
    assert main(["evaluate", str(model), str(tile), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert list(rows) == ["0.1 % *", "0.5 % *", "1 % (model) *", "2 % *", "5 %",
                          "f1-optimal (test labels)"]
    for p, (label, (threshold, recall, frr)) in zip(op["points"], rows.items()):
        assert float(threshold) == pytest.approx(p["threshold"], rel=1e-5), label
        assert float(recall) == pytest.approx(p["recall"], abs=5e-5), label
        assert float(frr) == pytest.approx(p["frr_test"], abs=5e-5), label
    assert ("recommendation:" in out) == (op["recommendation"] is not None)

    # the report: the table, the plot, and the same numbers in metrics.json
    html = (report / "report.html").read_text()
    assert "<h2>Operating points</h2>" in html and "Recall vs false-reject rate" in html
    assert "flawscope calibrate MODEL --max-frr" in html
    assert (report / "recall_frr.png").stat().st_size > 0
    doc = json.loads((report / "metrics.json").read_text())
    assert doc["models"]["ncae"]["operating_points"]["points"] == op["points"]


def test_calibrate_max_frr_without_images(model, tile, tmp_path, capsys):
    from flawscope.pipeline import Inspector

    out = tmp_path / "five.safetensors"
    assert main(["evaluate", str(model), str(tile), "--json", "--device", "cpu"]) == 0
    points = json.loads(capsys.readouterr().out)["operating_points"]["points"]
    assert main(["calibrate", str(model), "--max-frr", "0.05", "-o", str(out),
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "old: threshold" in err and "new: threshold" in err
    before, after = Inspector.load(model), Inspector.load(out)
    assert after.threshold.max_frr == 0.05 and after.threshold.rule == "good-quantile"
    assert after.threshold.value == next(p["threshold"] for p in points if p["max_frr"] == 0.05)
    # no refit: the same detector, the same stored calibration scores
    np.testing.assert_array_equal(after.calibration_scores, before.calibration_scores)
    assert main(["evaluate", str(out), str(tile), "--device", "cpu"]) == 0
    assert "5 % (model)" in capsys.readouterr().out

    assert main(["calibrate", str(model), "-o", str(out)]) == 2  # neither images nor a target
    assert "--max-frr" in capsys.readouterr().err
    assert main(["calibrate", str(model), "--max-frr", "0.05", "--threshold-rule",
                 "f1-optimal", "-o", str(out)]) == 2
    assert "need good images" in capsys.readouterr().err


# ------------------------------------------------------------- errors before heavy imports
PROBE = """
import sys, time
t0 = time.perf_counter()
from flawscope.cli import main
status = main(sys.argv[1:])
print(status, "torch" in sys.modules, "timm" in sys.modules, round(time.perf_counter() - t0, 3))
"""


def _probe(*args: str) -> tuple[int, bool, bool, float, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                       env=env, timeout=120)
    status, torch, timm, seconds = r.stdout.split()
    return int(status), torch == "True", timm == "True", float(seconds), r.stderr


@pytest.mark.parametrize("args, message", [
    (["predict", "m.safetensors", "nope"], "m.safetensors: no such model file"),
    (["predict", "{model}", "nope"], "nope: no such file or folder"),
    (["predict", "{model}", "{here}", "--classifier", "c.safetensors"],
     "--classifier c.safetensors: no such model file"),
    (["evaluate", "{model}", "no-data"], "no-data: no such folder"),
    (["fit", "no-data", "-o", "{tmp}/m.safetensors"], "no-data: no such folder"),
    (["fit", "{here}", "--model", "patchcor", "-o", "{tmp}/m.safetensors"],
     "--model patchcor: unknown model; choose from"),
    (["fit", "--good", "nope", "-o", "{tmp}/m.safetensors"], "--good nope: no such file"),
    (["calibrate", "{model}", "nope", "-o", "{tmp}/m.safetensors"], "nope: no such file"),
    (["export", "m.safetensors", "-o", "{tmp}/m.onnx"], "m.safetensors: no such model file"),
    (["classify", "predict", "c.safetensors", "x.png"], "c.safetensors: no such model file"),
])
def test_wrong_path_fails_fast_without_torch(args, message, tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"not read: the paths are checked first")
    here = Path(__file__).parent
    args = [a.format(model=model, here=here, tmp=tmp_path) for a in args]
    status, torch, timm, seconds, err = _probe(*args)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err, err
    assert not torch and not timm
    assert seconds < 1.0


@pytest.mark.parametrize("option", [["--max-frr", "5"], ["--max-frr", "-0.1"],
                                    ["--image-size", "0"]])
def test_option_values_checked_by_the_parser(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(tmp_path), "-o", str(tmp_path / "m.safetensors"), *option])
    assert exc.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_models_in_user_words(capsys):
    from flawscope.cli.common import MODEL_DESCRIPTIONS
    from flawscope.models import list_models

    assert sorted(MODEL_DESCRIPTIONS) == sorted(list_models())
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    for developer_text in (":class:", "docstring", "``"):
        assert developer_text not in out


# ----------------------------------------------------------------------------- progress
def test_evaluate_shows_progress_with_total_and_estimate(model, tile, tmp_path, capsys,
                                                         monkeypatch):
    import flawscope.evaluation as evaluation
    import flawscope.progress as progress

    monkeypatch.setattr(evaluation, "PROGRESS_CHUNK", 4)  # several updates on a small set
    monkeypatch.setattr(progress.LineProgress, "__init__", _eager(progress.LineProgress))
    assert main(["evaluate", str(model), str(tile), "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    n = json.loads(captured.out)["n_images"]
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("scoring test images")]
    assert any(f"/{n} img" in ln and "left)" in ln for ln in lines), captured.err
    assert lines[-1].startswith(f"scoring test images: done, {n}/{n} img")
    # --quiet: none of it
    assert main(["evaluate", str(model), str(tile), "--json", "--quiet", "--device", "cpu"]) == 0
    assert "scoring test images" not in capsys.readouterr().err


def _eager(cls):
    """``LineProgress.__init__`` with no minimum interval between lines."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.interval = 0.0

    return __init__


def test_line_progress_estimates_time_left():
    import io

    from flawscope.progress import LineProgress

    out = io.StringIO()
    bar = LineProgress(8, "fit", out, interval=0.0)
    for _ in range(8):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(" (")[0] for ln in lines[:3]] == ["fit: 25%", "fit: 50%", "fit: 75%"]
    assert all("s left)" in ln and "/8 img" in ln for ln in lines[:3])
    assert lines[-1].startswith("fit: done, 8/8 img in")


def test_recommendation_is_a_command_that_runs(model, tile, tmp_path, capsys):
    """The recommended calibrate command, as printed, is accepted by the CLI."""
    import shlex

    from flawscope.operating import OperatingPoint, recommendation

    points = [OperatingPoint(0.01, 2.0, True, recall=0.5, frr_test=0.01),
              OperatingPoint(0.05, 1.0, True, recall=0.88, frr_test=0.05)]
    model_copy = tmp_path / "part.safetensors"
    model_copy.write_bytes(model.read_bytes())
    line = recommendation(points, 0.01, str(model_copy))
    assert line.startswith("at 1.0% false rejects 50% of the test defects pass; at 5.0%: 88%")
    command = shlex.split(line.split("`")[1])
    assert command[:2] == ["flawscope", "calibrate"]
    assert main([*command[1:], "--device", "cpu"]) == 0
    assert (tmp_path / "part-frr0.05.safetensors").exists()
