"""Hostile inputs of issue 29: each is a one-line error naming the file or field, or a success.

Odd file names (not valid UTF-8), model files whose header is JSON but not an object, ONNX
files with bad or absurd metadata, old-format model files as a downgrade path, and a folder
layout with an empty ``good/``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from flawscope.cli import main
from flawscope.data.dataset import hash_fraction, open_dataset, split_good
from flawscope.io import atomic_write_text, printable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--image-size", "32", "--epochs", "1", "--device", "cpu", "--quiet",
        "--param", "widths=[8,16]", "--param", "latent_channels=8", "--param", "batch_size=8"]
#: a file name that is not valid UTF-8, as Python sees it (``surrogateescape``)
ODD = os.fsdecode(b"bad\xff.png")


# ---------------------------------------------------------------------- odd file names
def test_hash_fraction_of_a_name_that_is_not_utf8():
    assert 0 <= hash_fraction(ODD) < 1
    assert hash_fraction(ODD) != hash_fraction(os.fsdecode(b"bad\xfe.png"))
    # valid names hash exactly as before (splits of existing datasets do not move)
    digest = hashlib.sha1(b"000.png").digest()
    assert hash_fraction("000.png") == int.from_bytes(digest[:8], "big") / 2**64


def test_text_files_escape_names_that_are_not_utf8(tmp_path):
    assert printable(f"x/{ODD}") == "x/bad\\udcff.png"
    out = atomic_write_text(tmp_path / "t.csv", f"path\n{ODD}\n")
    assert out.read_text(encoding="utf-8") == "path\nbad\\udcff.png\n"


@pytest.fixture
def odd_dataset(synthetic_root, tmp_path) -> Path:
    data = tmp_path / "tile"
    shutil.copytree(synthetic_root / "tile", data)
    image = (data / "train" / "good" / "000.png").read_bytes()
    for folder in ("train/good", "test/good", "test/hole"):
        (data / folder / ODD).write_bytes(image)
    return data


def test_dataset_with_names_that_are_not_utf8_splits(odd_dataset):
    dataset = open_dataset(odd_dataset)
    assert sum(s.path.name == ODD for s in dataset.samples) == 3
    fit, val, cal = split_good(dataset.train)
    assert len(fit) + len(val) + len(cal) == len(dataset.train)


def test_fit_evaluate_predict_with_names_that_are_not_utf8(odd_dataset, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    assert main(["fit", str(odd_dataset), "--model", "ncae", "-o", str(model), *TINY]) == 0
    capsys.readouterr()
    table = tmp_path / "per-image.csv"
    assert main(["evaluate", str(model), str(odd_dataset), "--json", "--per-image", str(table),
                 "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    with open(table, newline="", encoding="utf-8") as fh:
        paths = [r["path"] for r in csv.DictReader(fh)]
    assert len(paths) == metrics["n_images"]
    assert sum(p.endswith("bad\\udcff.png") for p in paths) == 2
    rows = tmp_path / "predict.csv"
    assert main(["predict", str(model), str(odd_dataset / "test" / "hole"), "--json",
                 "--csv", str(rows), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(o["path"].endswith(ODD) for o in out) == 1  # JSON escapes it (\udcff)
    assert "bad\\udcff.png" in rows.read_text(encoding="utf-8")


# ---------------------------------------------------------------------- model file headers
def _safetensors_with_header(path: Path, header: object) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    return path


@pytest.mark.parametrize("header, kind", [
    ([1, 2, 3], "array"), ("text", "string"), (42, "number"), (None, "null"),
])
def test_header_that_is_json_but_not_an_object(tmp_path, header, kind):
    from flawscope.errors import ModelFileError
    from flawscope.modelfile import load_model
    from flawscope.pipeline import Inspector
    from flawscope.runtime import load_any_model

    bad = _safetensors_with_header(tmp_path / "list.safetensors", header)
    expected = (f"{bad}: not a flawscope model file (its header is a JSON {kind}, expected "
                "an object)")
    for load in (load_model, Inspector.load, load_any_model):
        with pytest.raises(ModelFileError) as info:
            load(bad)
        assert str(info.value) == expected


def test_metadata_that_is_not_an_object(tmp_path, capsys):
    bad = _safetensors_with_header(tmp_path / "m.safetensors", {"__metadata__": ["x"]})
    assert main(["predict", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"flawscope: error: {bad}: not a flawscope model file (__metadata__ is a "
                   "JSON array, expected an object)")
