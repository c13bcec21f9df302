"""A new user's first steps: fast help that lists the layouts and defaults, ``fit --good``,
factory folder names, and logs without progress-bar frames."""

from __future__ import annotations

import inspect
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flawscope.cli import main
from flawscope.progress import LineProgress, progress_bar

SRC = str(Path(__file__).parents[1] / "src")
HEAVY = ("torch", "timm", "torchvision", "fastapi", "uvicorn", "onnx", "onnxruntime", "sklearn",
         "numpy", "scipy")
TINY_NCAE = ["--model", "ncae", "--image-size", "32", "--epochs", "2", "--device", "cpu",
             "--param", "widths=[8,16]", "--param", "latent_channels=8",
             "--param", "batch_size=8"]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_help_imports_no_heavy_library():
    """``flawscope --help`` and every sub-command's help build without torch & co."""
    code = f"""
import argparse, json, sys
from flawscope.cli import build_parser
parser = build_parser()
parser.format_help()
for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
        for sub in action.choices.values():
            sub.format_help()
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_parser_constants_match_the_library():
    from flawscope.cli import common
    from flawscope.data.dataset import READERS
    from flawscope.layouts import LAYOUT_EXPECTS, LAYOUTS
    from flawscope.pipeline import DEFAULT_MODEL, THRESHOLD_RULES
    from flawscope.regions import DEFAULT_MIN_REGION_AREA

    assert common.DEFAULT_MIN_REGION_AREA == DEFAULT_MIN_REGION_AREA
    assert common.DEFAULT_MODEL == DEFAULT_MODEL
    assert tuple(THRESHOLD_RULES) == common.THRESHOLD_RULES
    assert set(LAYOUTS) == set(READERS) == set(LAYOUT_EXPECTS)


def _help(capsys, monkeypatch, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside hyphenated words
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def _default(model: str, name: str):
    from flawscope.models import get_model_class

    cls = get_model_class(model)
    for klass in cls.__mro__:
        p = inspect.signature(klass.__init__).parameters.get(name)
        if p is not None:
            return p.default
    raise KeyError(name)


def test_fit_help_lists_layouts_and_defaults(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "fit")
    for layout in ("folder", "mvtec", "casting", "magnetic-tile"):
        assert f"{layout} DATA/" in text
    assert "DATA/ok/*.png DATA/ng/*.png" in text and "--good DIR" in text
    assert "--defect DIR" in text
    # every option with a default shows it
    for shown in ("--model NAME", "`flawscope models`", "(default: patchcore)", "(default: 0.01)",
                  "(default: good-quantile)", "(default: auto)"):
        assert shown in text
    # the per-model defaults stated in the help are the models' real defaults
    assert f"default: {_default('patchcore', 'image_size')} for patchcore" in text
    assert f"{_default('ncae', 'image_size')} x {_default('ncae', 'image_size')} for ncae" in text
    assert f"default: {_default('ncae', 'epochs')})" in text
    assert f"default: {_default('ncae', 'score_rule')})" in text
    assert f"default: {_default('patchcore', 'backbone')})" in text
    assert f"default: {_default('patchcore', 'coreset_ratio')})" in text
    assert f"default: {_default('patchcore', 'batch_size')} for patchcore" in text
    assert f"{_default('ncae', 'batch_size')} for the autoencoders" in text
    assert f"default: {_default('patchcore', 'seed')})" in text


def test_fit_needs_data_or_good(tmp_path, capsys):
    assert main(["fit", "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "give a dataset folder DATA or good images with --good" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    assert main(["fit", str(tmp_path / "d"), "--good", str(tmp_path / "d"),
                 "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "not both" in capsys.readouterr().err


def test_fit_on_ok_ng_folder_logs_plain_lines(synthetic_root, tmp_path, capsys):
    """``ok/`` + ``ng/`` is a dataset; progress in a non-terminal stderr is plain lines."""
    src = synthetic_root / "tile"
    data = tmp_path / "line"
    for p in sorted((src / "train" / "good").glob("*.png")):
        (data / "ok").mkdir(parents=True, exist_ok=True)
        (data / "ok" / p.name).write_bytes(p.read_bytes())
    for p in sorted((src / "test" / "hole").glob("*.png")):
        (data / "ng").mkdir(exist_ok=True)
        (data / "ng" / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "m.safetensors"
    assert main(["fit", str(data), "-o", str(out), *TINY_NCAE]) == 0
    captured = capsys.readouterr()
    assert out.exists() and f"model written to {out}" in captured.out
    assert "folder layout" in captured.err
    assert "\r" not in captured.err and "\x1b[" not in captured.err
    assert "epoch 1/2: done" in captured.err and "epoch 2/2: done" in captured.err
    assert f"flawscope serve {out}" in captured.err


@pytest.mark.slow  # a whole fit + evaluate + report workflow
def test_fit_good_folder_log_file_has_no_bar_frames(synthetic_root, tmp_path):
    """The scenario of the report: ``fit ... 2> fit.log``."""
    out = tmp_path / "m.safetensors"
    log = tmp_path / "fit.log"
    env = {**os.environ, "PYTHONPATH": SRC}
    with open(log, "w") as err:
        r = subprocess.run(
            [sys.executable, "-m", "flawscope", "fit", "--good",
             str(synthetic_root / "tile" / "train" / "good"), "-o", str(out), *TINY_NCAE],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text
    assert out.exists() and "--good images" in text
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]


def test_line_progress_writes_plain_lines(monkeypatch):
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    with progress_bar(8, "features") as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(8):
            bar.update(1)
        bar.set_postfix(loss="0.5")
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("features: done, 8/8 img in ")
    assert lines[0].endswith("loss=0.5") and "\r" not in err.getvalue()
    # long phases also report each quarter (here: no minimum interval)
    slow = LineProgress(100, "coreset", err, interval=0.0)
    err.truncate(0), err.seek(0)
    for _ in range(10):
        slow.update(10)
    slow.close()
    assert [line.split(" (")[0] for line in err.getvalue().splitlines()[:3]] == [
        "coreset: 25%", "coreset: 50%", "coreset: 75%"]
    # disabled: nothing at all
    err.truncate(0), err.seek(0)
    with progress_bar(5, "quiet", enabled=False) as bar:
        bar.update(5)
    assert err.getvalue() == ""


def test_terminal_gets_a_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress_bar(3, "epoch 1/1")
    assert not isinstance(bar, LineProgress)
    bar.update(3)
    bar.close()
    assert "\r" in sys.stderr.getvalue()  # tqdm redraws in place on a terminal

