"""The CLI contract: fit / predict / evaluate on the synthetic data, and clean errors."""

from __future__ import annotations

import csv
import json
import os
import re
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
    assert lines[0].split() == ["path", "score", "normalized", "threshold", "verdict",
                                "regions"]
    n = len(list(folder.glob("*.png")))
    assert len(lines) == 1 + n + 1
    for line in lines[1:-1]:
        assert 0.0 <= float(line.split()[2]) <= 1.0  # the normalised score
    assert re.fullmatch(rf"{n} images: (\d+) defect, (\d+) ok; threshold \S+; "
                        r"runtime (torch|onnxruntime)", lines[-1])


@pytest.mark.slow  # a whole fit + evaluate + report workflow
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


@pytest.mark.slow  # a subprocess: the process boundary is the point
def test_gray_model_accepts_rgb_and_16bit(model, tmp_path, capsys):
    rgb = write_png(tmp_path / "rgb.png", np.full((50, 40, 3), 128, np.uint8))
    deep = write_png(tmp_path / "deep.png", np.full((20, 20), 30000, np.uint16))
    assert main(["predict", str(model), str(rgb), str(deep), "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.mark.slow  # the first case in a subprocess: the process boundary is the point
def test_bad_image_one_line_error(model, tmp_path, capsys):
    def bad_file(name: str, content: bytes | None) -> Path:
        bad = tmp_path / name
        if content is not None:
            bad.write_bytes(content)
        return bad

    empty = bad_file("empty.png", b"")
    r = run_cli("predict", str(model), str(empty))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "Traceback" not in r.stderr
    for bad in (bad_file("text.png", b"not an image"), bad_file("missing.png", None)):
        assert main(["predict", str(model), str(bad)]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in err


def test_skip_bad_lists_and_continues(model, synthetic_root, tmp_path, capsys):
    bad = tmp_path / "trunc.png"
    good = sorted((synthetic_root / "tile" / "test" / "good").glob("*.png"))[0]
    bad.write_bytes(good.read_bytes()[:100])
    assert main(["predict", str(model), str(good), str(bad), "--skip-bad", "--json",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 1 and str(bad) in captured.err


@pytest.mark.slow  # the first case in a subprocess: exit code and stderr at the boundary
def test_cli_errors_name_the_input(model, tmp_path, capsys):
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
    r = run_cli(*cases[0][0])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert cases[0][1] in r.stderr and "Traceback" not in r.stderr
    capsys.readouterr()
    for args, message in cases[1:]:  # in-process: the same main(), no torch re-import each
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert message in err and "Traceback" not in err, (message, err)


@pytest.mark.slow  # a subprocess: the process boundary is the point
def test_debug_shows_traceback(tmp_path, capsys):
    assert main(["--debug", "predict", str(tmp_path / "missing.safetensors"),
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "no such model" in err


@pytest.mark.slow  # a whole fit + evaluate workflow
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
    assert main(["fit", str(data), "--model", "ncae", "-o", str(out), *TINY]) == 2
    assert "zz_broken.png" in capsys.readouterr().err and not out.exists()
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
    assert main(["calibrate", str(model), str(goods), "-o", str(f1), "--threshold-rule",
                 "f1-optimal"]) == 2
    assert "needs labelled defect images" in capsys.readouterr().err


def test_calibrate_refuses_training_images_and_shows_old_and_new(model, synthetic_root,
                                                                  tmp_path, capsys):
    from flawscope.data.dataset import split_good

    fit, _, held_out = split_good(sorted((synthetic_root / "tile" / "train" / "good")
                                         .glob("*.png")))
    train = sorted(fit)
    goods = sorted((synthetic_root / "tile" / "test" / "good").glob("*.png"))
    out = tmp_path / "recal.safetensors"
    capsys.readouterr()
    # the autoencoder's held-out calibration goods never shaped its weights: accepted
    assert main(["calibrate", str(model), *map(str, goods + held_out), "-o", str(out),
                 "--device", "cpu", "--max-frr", "0.2"]) == 0
    out.unlink()
    args = ["calibrate", str(model), *map(str, goods + train[:2]), "-o", str(out),
            "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 of the" in err and train[0].name in err and not out.exists()
    assert main([*args, "--allow-training-images", "--max-frr", "0.2"]) == 0
    err = capsys.readouterr().err
    assert "old: threshold" in err and "new: threshold" in err and " -> " in err


# ---------------------------------------------------------------------------- line workflow
def _with_threshold(model: Path, value: float, out: Path) -> Path:
    """A copy of ``model`` with its threshold set by hand (all defect / all OK)."""
    from flawscope.pipeline import Inspector
    from flawscope.threshold import Threshold

    inspector = Inspector.load(model, device="cpu")
    inspector.threshold = Threshold(value, "manual")
    return inspector.save(out)


def test_predict_json_has_regions(model, synthetic_root, tmp_path, capsys):
    everything = _with_threshold(model, -1.0, tmp_path / "all-defect.safetensors")
    imgs = sorted((synthetic_root / "tile" / "test" / "hole").glob("*.png"))[:2]
    assert main(["predict", str(everything), *map(str, imgs), "--json", "--device", "cpu",
                 "--mm-per-pixel", "0.1"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "2 images: 2 defect, 0 ok" in captured.err
    for o in out:
        assert o["verdict"] == "defect" and len(o["regions"]) >= 1
        assert isinstance(o["pixel_threshold"], float)
        for r in o["regions"]:
            assert set(r) == {"bbox", "area_px", "max_score", "peak", "area_mm2", "status"}
            assert r["area_mm2"] == pytest.approx(r["area_px"] * 0.01)


def test_predict_csv_overlays_and_fail_on_defect(model, synthetic_root, tmp_path, capsys):
    imgs = sorted((synthetic_root / "tile" / "test" / "hole").glob("*.png"))[:3]
    args = [*map(str, imgs), "--device", "cpu"]
    everything = _with_threshold(model, -1.0, tmp_path / "all-defect.safetensors")
    nothing = _with_threshold(model, 1e9, tmp_path / "all-ok.safetensors")
    table = tmp_path / "out" / "line.csv"
    overlays = tmp_path / "overlays"
    assert main(["predict", str(everything), *args, "--csv", str(table), "--save-overlays",
                 str(overlays), "--fail-on-defect", "--min-region-area", "1"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "3 images: 3 defect, 0 ok; threshold -1")
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [str(p) for p in imgs]
    assert list(rows[0]) == ["path", "score", "normalized_score", "threshold", "verdict",
                             "n_regions", "largest_region_area_px", "regions"]
    assert all(r["verdict"] == "defect" and int(r["n_regions"]) >= 1
               and int(r["largest_region_area_px"]) > 0 for r in rows)
    assert {float(r["threshold"]) for r in rows} == {-1.0}
    for r in rows:  # the boxes, as the JSON output gives them
        boxes = json.loads(r["regions"])
        assert len(boxes) == int(r["n_regions"])
        assert all(len(b["bbox"]) == 4 and b["area_px"] > 0 for b in boxes)
    assert not list(table.parent.glob(".*.tmp"))  # written atomically, nothing left over
    pngs = sorted(overlays.glob("*.png"))
    assert [p.stem for p in pngs] == sorted(p.stem for p in imgs)
    from PIL import Image

    from flawscope.heatmap import CAPTION_MIN_WIDTH, VERDICT_COLOURS

    def caption_colours(png: Path) -> tuple[np.ndarray, np.ndarray]:
        """The picture (the model input, enlarged to the caption width) and the caption."""
        with Image.open(png) as im:
            assert im.mode == "RGB" and im.width == CAPTION_MIN_WIDTH  # 32 px enlarged
            assert im.height > CAPTION_MIN_WIDTH  # a caption band below the square picture
            a = np.asarray(im)
        return a[:CAPTION_MIN_WIDTH], a[CAPTION_MIN_WIDTH:]

    picture, caption = caption_colours(pngs[0])
    assert (picture == (255, 0, 255)).all(axis=2).any()  # a region outline
    assert (caption == VERDICT_COLOURS["defect"]).all(axis=2).any()  # the verdict line
    assert not (caption == VERDICT_COLOURS["ok"]).all(axis=2).any()
    # the same parts under an impossible threshold: all OK, exit 0 even with the flag
    assert main(["predict", str(nothing), *args, "--fail-on-defect", "--save-overlays",
                 str(tmp_path / "ok-overlays")]) == 0
    assert "3 images: 0 defect, 3 ok" in capsys.readouterr().out
    _, caption = caption_colours(sorted((tmp_path / "ok-overlays").glob("*.png"))[0])
    assert (caption == VERDICT_COLOURS["ok"]).all(axis=2).any()


def test_predict_region_options_are_checked(model, synthetic_root, capsys):
    img = sorted((synthetic_root / "tile" / "test" / "good").glob("*.png"))[0]
    assert main(["predict", str(model), str(img), "--min-region-mm2", "2"]) == 2
    assert "min_region_mm2 needs mm_per_pixel" in capsys.readouterr().err
    assert "exit status" in build_help("predict")


def build_help(command: str) -> str:
    from flawscope.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_evaluate_region_metrics_and_per_image_csv(model, synthetic_root, tmp_path, capsys):
    table = tmp_path / "per-image.csv"
    assert main(["evaluate", str(model), str(synthetic_root / "tile"), "--json",
                 "--per-image", str(table), "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    for key in ("pixel_f1", "pixel_iou", "region_f1", "region_precision", "region_recall",
                "pixel_threshold"):
        assert key in m, key
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == m["n_images"]
    assert {"path", "label", "score", "verdict", "n_regions", "pixel_iou", "gt_regions",
            "gt_regions_found"} <= set(rows[0])
    for r in rows:
        assert (int(r["n_regions"]) >= 1) == (r["verdict"] == "defect")
        if r["label"] == "0":
            assert r["gt_regions"] == "0" and r["gt_regions_found"] == "0"
        assert int(r["gt_regions_found"]) <= int(r["gt_regions"])


def test_file_names_that_are_not_utf8_print_escaped(model, synthetic_root, tmp_path, capsys):
    good = sorted((synthetic_root / "tile" / "test" / "good").glob("*.png"))[0]
    odd = tmp_path / os.fsdecode(b"part-\xff.png")
    odd.write_bytes(good.read_bytes())
    assert main(["predict", str(model), str(odd), "--device", "cpu"]) == 0
    assert "part-\\udcff.png" in capsys.readouterr().out  # escaped, no UnicodeEncodeError


def _failing_command(monkeypatch, exc: BaseException) -> None:
    """Make ``flawscope models`` raise ``exc`` (as a command deep inside would)."""
    import flawscope.cli.detect as detect

    def boom(args):
        raise exc

    monkeypatch.setattr(detect, "cmd_models", boom)


def test_closed_pipe_ends_quietly(monkeypatch, capsys):
    _failing_command(monkeypatch, BrokenPipeError(32, "Broken pipe"))
    assert main(["models"]) == 0
    assert capsys.readouterr().err == ""


def test_missing_optional_module_names_the_extra(monkeypatch, capsys):
    _failing_command(monkeypatch, ModuleNotFoundError("No module named 'onnx'", name="onnx"))
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "flawscope[export]"' in err and "Traceback" not in err


def test_internal_errors_have_their_own_exit_status(monkeypatch, capsys):
    _failing_command(monkeypatch, ZeroDivisionError("oops"))
    assert main(["models"]) == 3  # not 1, which predict --fail-on-defect uses for a defect
    assert "internal error: ZeroDivisionError" in capsys.readouterr().err


def test_models_lists_the_registry(capsys):
    from flawscope.models import list_models

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_models()
    patchcore = next(r for r in rows if r["name"] == "patchcore")
    assert patchcore["default"] and patchcore["options"]["coreset_ratio"] == 0.1


@pytest.mark.slow  # a whole fit + evaluate + report workflow
def test_evaluate_statistics_csv_and_report_section(model, synthetic_root, tmp_path):
    from flawscope.residual import STATISTICS

    stats, report = tmp_path / "stats.csv", tmp_path / "report"
    assert main(["evaluate", str(model), str(synthetic_root / "tile"), "--statistics",
                 str(stats), "--report", str(report), "--device", "cpu", "--json"]) == 0
    with stats.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list((synthetic_root / "tile" / "test").rglob("*.png")))
    assert all(np.isfinite([float(r[n]) for n in STATISTICS]).all() for r in rows)
    html = (report / "report.html").read_text()
    assert "<h3>Residual statistics</h3>" in html
    assert len(list(report.glob("statistic_*.png"))) == len(STATISTICS)
    assert list(report.glob("residual_*.png"))


def test_fit_any_image_size_and_channels(synthetic_root, tmp_path):
    """The design document's form (300 px, 1 channel) at test scale: a size that is not a
    multiple of the autoencoder's down-sampling, gray input forced on colour images."""
    from flawscope.pipeline import Inspector

    out = tmp_path / "odd.safetensors"
    tiny = [a for a in TINY if a not in ("32",)]
    tiny[tiny.index("--image-size") + 1:tiny.index("--image-size") + 1] = ["30"]
    assert main(["fit", str(synthetic_root / "washer"), "--model", "ncae", "-o", str(out),
                 "--channels", "1", *tiny]) == 0
    inspector = Inspector.load(out)
    assert inspector.input_size == (30, 30) and inspector.channels == 1
    with pytest.raises(SystemExit) as bad:  # argparse: choices 1 or 3
        main(["fit", str(synthetic_root / "washer"), "-o", str(out), "--channels", "2"])
    assert bad.value.code == 2
