"""The CLI contract: fit / predict / evaluate on the synthetic data, and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_png
from flawscope.cli import main

TINY = ["--image-size", "32", "--epochs", "2", "--device", "cpu", "--quiet",
        "--param", "widths=[8,16]", "--param", "latent_channels=8", "--param", "batch_size=8"]


@pytest.fixture(scope="module")
def model(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tile.safetensors"
    args = ["fit", str(synthetic_root / "tile"), "--model", "ncae", "-o", str(out), *TINY]
    assert main(args) == 0
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "flawscope", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_fit_writes_model_and_no_checkpoint(model):
    assert model.exists() and model.stat().st_size > 0
    assert not model.with_name(model.name + ".ckpt").exists()


def test_predict_json_contract(model, synthetic_root, capsys):
    imgs = sorted((synthetic_root / "tile" / "test" / "hole").glob("*.png"))[:2]
    good = sorted((synthetic_root / "tile" / "test" / "good").glob("*.png"))[:1]
    order = [imgs[0], good[0], imgs[1]]
    assert main(["predict", str(model), *map(str, order), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["path"] for o in out] == [str(p) for p in order]
    for o in out:
        assert set(o) >= {"path", "score", "threshold", "verdict", "normalized_score"}
        assert o["verdict"] == ("defect" if o["score"] > o["threshold"] else "ok")
        assert 0.0 <= o["normalized_score"] <= 1.0


def test_predict_folder_and_table(model, synthetic_root, capsys):
    folder = synthetic_root / "tile" / "test" / "good"
    assert main(["predict", str(model), str(folder), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["path", "score", "threshold", "verdict"]
    assert len(lines) == 1 + len(list(folder.glob("*.png")))


def test_evaluate_json_and_report(model, synthetic_root, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["evaluate", str(model), str(synthetic_root / "tile"), "--json",
                 "--report", str(report), "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    for key in ("image_auroc", "image_auprc", "f1", "accuracy", "precision", "recall",
                "threshold", "pixel_auroc", "aupro"):
        assert isinstance(m[key], float), key
    assert 0 <= m["image_auroc"] <= 1
    assert (report / "report.html").exists() and (report / "roc.png").exists()


def test_gray_model_accepts_rgb_and_16bit(model, tmp_path, capsys):
    rgb = write_png(tmp_path / "rgb.png", np.full((50, 40, 3), 128, np.uint8))
    deep = write_png(tmp_path / "deep.png", np.full((20, 20), 30000, np.uint16))
    assert main(["predict", str(model), str(rgb), str(deep), "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.mark.parametrize("content", [b"", b"not an image", None])
def test_bad_image_one_line_error(model, tmp_path, content):
    bad = tmp_path / "bad.png"
    if content is not None:
        bad.write_bytes(content)
    r = run_cli("predict", str(model), str(bad))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in r.stderr


def test_skip_bad_lists_and_continues(model, synthetic_root, tmp_path, capsys):
    bad = tmp_path / "trunc.png"
    good = sorted((synthetic_root / "tile" / "test" / "good").glob("*.png"))[0]
    bad.write_bytes(good.read_bytes()[:100])
    assert main(["predict", str(model), str(good), str(bad), "--skip-bad", "--json",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 1 and str(bad) in captured.err


def test_cli_errors_name_the_input(model, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (["predict", str(model), str(tmp_path / "empty")], "no image files"),
        (["fit", str(tmp_path / "empty"), "-o", str(tmp_path / "m")], "unknown dataset layout"),
        (["fit", str(tmp_path / "nope"), "-o", str(tmp_path / "m")], "no such folder"),
        (["predict", str(tmp_path / "empty" / "x.safetensors"), str(model)], "no such model"),
        (["predict", str(Path(__file__)), str(model)], "not a flawscope model"),
        (["fit", str(tmp_path), "--model", "ncae", "-o", str(tmp_path / "m"),
          "--param", "bogus=1"], "unknown option"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert message in r.stderr, (message, r.stderr)
        assert "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "predict", str(tmp_path / "missing.safetensors"), str(tmp_path))
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_fit_and_evaluate_skip_bad_files(synthetic_root, tmp_path, capsys):
    import shutil

    data = tmp_path / "tile"
    shutil.copytree(synthetic_root / "tile", data)
    bad_train = data / "train" / "good" / "zz_broken.png"
    bad_train.write_bytes(b"")
    bad_test = data / "test" / "hole" / "zz_cut.png"
    bad_test.write_bytes((data / "test" / "hole" / "000.png").read_bytes()[:80])
    out = tmp_path / "m.safetensors"
    # without --skip-bad the first unreadable file stops the run, naming it
    r = run_cli("fit", str(data), "--model", "ncae", "-o", str(out), *TINY)
    assert r.returncode == 2 and "zz_broken.png" in r.stderr and not out.exists()
    assert main(["fit", str(data), "--model", "ncae", "-o", str(out), "--skip-bad", *TINY]) == 0
    assert "zz_broken.png" in capsys.readouterr().err
    assert main(["evaluate", str(out), str(data), "--json", "--skip-bad", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "zz_cut.png" in captured.err
    assert json.loads(captured.out)["n_images"] == len(list((data / "test").rglob("*.png"))) - 1


def test_calibrate_rules(model, synthetic_root, tmp_path, capsys):
    from flawscope.pipeline import Inspector

    goods = synthetic_root / "tile" / "test" / "good"
    loose = tmp_path / "loose.safetensors"
    assert main(["calibrate", str(model), str(goods), "-o", str(loose), "--max-frr", "0.5",
                 "--device", "cpu"]) == 0
    before, after = Inspector.load(model), Inspector.load(loose)
    assert after.threshold.rule == "good-quantile" and after.threshold.max_frr == 0.5
    assert after.threshold.n_good == len(list(goods.glob("*.png")))
    assert after.threshold.value < before.threshold.value  # rejecting more goods: lower bar
    f1 = tmp_path / "f1.safetensors"
    defects = synthetic_root / "tile" / "test" / "hole"
    assert main(["calibrate", str(model), str(goods), "-o", str(f1), "--defects", str(defects),
                 "--threshold-rule", "f1-optimal", "--device", "cpu"]) == 0
    t = Inspector.load(f1).threshold
    assert t.rule == "f1-optimal" and t.n_defect == len(list(defects.glob("*.png")))
    r = run_cli("calibrate", str(model), str(goods), "-o", str(f1), "--threshold-rule",
                "f1-optimal")
    assert r.returncode == 2 and "needs labelled defect images" in r.stderr
