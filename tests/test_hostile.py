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

import numpy as np
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


# ---------------------------------------------------------------------- ONNX metadata
def _tiny_detector_onnx(path: Path, meta: dict[str, str], side: int | str = 32) -> Path:
    """A hand-made graph with the exported detector's inputs and outputs (the score is the
    brightest pixel / 255), and ``meta`` as its ``metadata_props``."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from flawscope.runtime import INPUT_NAME

    dims = ["batch", 1, side, side]
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["scale"], value_float=1 / 255),
        helper.make_node("Mul", ["pixels", "scale"], ["unit"]),
        helper.make_node("ReduceMax", ["unit"], ["anomaly_map"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["unit"], ["score"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Identity", ["score"], ["normalized_score"]),
        helper.make_node("Constant", [], ["cut"], value_float=0.5),
        helper.make_node("Greater", ["score", "cut"], ["is_defect"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, dims)],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("normalized_score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, dims[:1] + dims[2:]),
         helper.make_tensor_value_info("is_defect", TensorProto.BOOL, ["batch"])])
    return _save_graph(graph, meta, path)


def _detector_meta(**changes: str) -> dict[str, str]:
    meta = {
        "flawscope_format": "flawscope-onnx", "flawscope_format_version": "1",
        "flawscope_version": "test", "model": "patchcore", "input_size": "[32, 32]",
        "channels": "1",
        "threshold": json.dumps({"value": 0.5, "rule": "manual"}),
        "normalization": json.dumps({"low": 0.0, "threshold": 0.5}),
        "pixel_threshold": "null", "map_scale": "score", "info": "{}",
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def test_onnx_with_valid_metadata_runs(tmp_path):
    import numpy as np

    from flawscope.runtime import load_any_model

    path = _tiny_detector_onnx(tmp_path / "ok.onnx", _detector_meta())
    inspector = load_any_model(path, device="cpu")
    images = np.zeros((2, 1, 32, 32), np.uint8)
    images[1, 0, 3, 3] = 255
    assert [p.verdict for p in inspector.predict(images)] == ["ok", "defect"]


ONNX_EDITS = {
    "version-not-a-number": ({"flawscope_format_version": "1.5"},
                             "flawscope_format_version: expected a whole number, got '1.5'"),
    "version-word": ({"flawscope_format_version": "two"},
                     "flawscope_format_version: expected a whole number, got 'two'"),
    "version-missing": ({"flawscope_format_version": None},
                        "flawscope_format_version: expected a whole number, got None"),
    "version-newer": ({"flawscope_format_version": "9"}, "in ONNX format 9; this flawscope"),
    "input-size-huge": ({"input_size": "[65536, 65536]"},
                        "input_size: 65536 pixels is outside 1..4096"),
    "input-size-not-json": ({"input_size": "[32,"}, "input_size: not valid JSON"),
    "channels": ({"channels": "4"}, "channels: expected 1 (gray) or 3 (RGB), got 4"),
    "channels-word": ({"channels": "gray"}, "channels: expected a whole number, got 'gray'"),
    "threshold-nan": ({"threshold": '{"value": NaN, "rule": "manual"}'}, "threshold.value"),
    "threshold-missing": ({"threshold": None}, "threshold: missing"),
    "normalization": ({"normalization": '{"low": 0}'}, "normalization"),
    "map-scale": ({"map_scale": "rainbow"}, "map_scale: expected one of score, image"),
    "pixel-threshold": ({"pixel_threshold": '{"value": "NaN"}'}, "pixel_threshold.value"),
    "info": ({"info": "[1]"}, "info: expected an object, got list"),
    "graph-disagrees": ({"input_size": "[16, 16]"},
                        "input_size / channels: the metadata says 1 x 16 x 16 but the "
                        "graph's input is batch x 1 x 32 x 32"),
}


@pytest.mark.parametrize("case", list(ONNX_EDITS))
def test_onnx_metadata_checked_like_a_model_file(tmp_path, case, capsys):
    from flawscope.errors import ModelFileError
    from flawscope.runtime import load_any_model

    changes, problem = ONNX_EDITS[case]
    path = _tiny_detector_onnx(tmp_path / f"{case}.onnx", _detector_meta(**changes))
    with pytest.raises(ModelFileError) as info:
        load_any_model(path, device="cpu")
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message
    assert main(["predict", str(path), str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"flawscope: error: {message}"


def test_onnx_absurd_input_size_refused_before_any_image(tmp_path):
    """65536 x 65536 in both metadata and graph: refused at load, nothing is allocated."""
    import resource

    from flawscope.errors import ModelFileError
    from flawscope.runtime import OnnxInspector

    path = _tiny_detector_onnx(tmp_path / "huge.onnx",
                               _detector_meta(input_size="[65536, 65536]"), side=65536)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelFileError, match=r"input_size: 65536 pixels is outside 1\.\.4096"):
        OnnxInspector(path, device="cpu")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000  # an image at that size would take 4 GiB (gray uint8)


def _save_graph(graph, meta: dict[str, str], path: Path) -> Path:
    """``graph`` as an opset-17 ONNX file at ``path`` with ``meta`` as its metadata_props."""
    import onnx
    from onnx import helper

    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return path


def _tiny_classifier_onnx(path: Path, meta: dict[str, str]) -> Path:
    """A hand-made graph with an exported classifier's input and output (3 labels)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[2, 3], keepdims=0),
             helper.make_node("Softmax", ["means"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.UINT8,
                                                      ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])])
    return _save_graph(graph, meta, path)


def _classifier_meta(**changes: str) -> dict[str, str]:
    meta = {"flawscope_format": "flawscope-onnx-classifier", "flawscope_format_version": "1",
            "kind": "classifier", "labels": '["a-good", "a-bent", "b-good"]',
            "input_size": "[32, 32]", "channels": "3", "mean": "[0.5, 0.5, 0.5]",
            "std": "[0.2, 0.2, 0.2]", "backbone": "resnet18", "fold_count": "1"}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


#: a classifier export written before detectors and classifiers shared one metadata schema
LEGACY_CLASSIFIER_META = {
    "format": "flawscope-onnx-classifier", "format_version": "1", "kind": "classifier",
    "labels": '["a-good", "a-bent", "b-good"]', "image_size": "[32, 32]", "channels": "3",
    "mean": "[0.5, 0.5, 0.5]", "std": "[0.2, 0.2, 0.2]", "backbone": "resnet18",
    "fold_count": "1", "tta": "none"}

CLASSIFIER_EDITS = {
    "valid": ({}, None),
    "version-word": ({"flawscope_format_version": "x"},
                     "flawscope_format_version: expected a whole number"),
    "version-newer": ({"flawscope_format_version": "7"}, "in ONNX format 7; this flawscope"),
    "labels": ({"labels": '{"a": 1}'}, "labels: expected a non-empty list of label names"),
    "input-size-huge": ({"input_size": "[65536, 65536]"},
                        "input_size: 65536 pixels is outside 1..4096"),
    "std-zero": ({"std": "[0, 1, 1]"}, "std[0]: expected a positive number, got 0"),
    "folds": ({"fold_count": "many"}, "fold_count: expected a whole number, got 'many'"),
    "augment-not-object": ({"augment": "[1]"}, "augment: expected an object, got list"),
    "detector-format": ({"flawscope_format": "flawscope-onnx", "kind": "detector"},
                        "is an exported detector, expected an exported classifier"),
}


@pytest.mark.parametrize("case", list(CLASSIFIER_EDITS))
def test_classifier_onnx_metadata_checked(tmp_path, case):
    import numpy as np

    from flawscope.classify.export import OnnxClassifier
    from flawscope.errors import ModelFileError

    changes, problem = CLASSIFIER_EDITS[case]
    path = _tiny_classifier_onnx(tmp_path / f"{case}.onnx", _classifier_meta(**changes))
    if problem is None:
        proba = OnnxClassifier(path).proba_from_uint8(np.zeros((2, 3, 32, 32), np.uint8))
        assert proba.shape == (2, 3)
        return
    with pytest.raises(ModelFileError) as info:
        OnnxClassifier(path)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


def test_legacy_classifier_export_still_loads(tmp_path):
    """Exports written with the classifier's old keys (``format``, ``image_size``) are read
    through the shared schema, with its checks."""
    import numpy as np

    from flawscope.classify.export import load_classifier
    from flawscope.errors import ModelFileError

    # no .onnx suffix: exports are recognised by content, as detectors are
    path = _tiny_classifier_onnx(tmp_path / "legacy.model", dict(LEGACY_CLASSIFIER_META))
    clf = load_classifier(path, device="cpu")
    assert clf.labels == ["a-good", "a-bent", "b-good"] and clf.image_size == (32, 32)
    assert clf.proba_from_uint8(np.zeros((1, 3, 32, 32), np.uint8)).shape == (1, 3)
    bad = _tiny_classifier_onnx(tmp_path / "legacy-bad.onnx",
                                {**LEGACY_CLASSIFIER_META, "image_size": "[0, 32]"})
    with pytest.raises(ModelFileError, match=r"input_size: 0 pixels is outside 1\.\.4096"):
        load_classifier(bad)


def test_classifier_export_is_not_a_detector(tmp_path, capsys):
    """A classifier export given where a detector is expected says what to do instead."""
    path = _tiny_classifier_onnx(tmp_path / "types.onnx", _classifier_meta())
    assert main(["predict", str(path), str(path)]) == 2
    err = capsys.readouterr().err
    assert "is a class + state classifier, not an anomaly detector" in err
    assert "flawscope classify predict" in err


# ---------------------------------------------------------------------- only defect images
@pytest.fixture
def only_defects(synthetic_root, tmp_path) -> dict[str, Path]:
    """The same defect images as a folder layout with an empty good/ and as an MVTec
    category with an empty train/good/ and no test/good/."""
    holes = sorted((synthetic_root / "tile" / "test" / "hole").glob("*.png"))
    folder = tmp_path / "folder"
    (folder / "good").mkdir(parents=True)
    mvtec = tmp_path / "mvtec" / "tile"
    (mvtec / "train" / "good").mkdir(parents=True)
    for target in (folder / "hole", mvtec / "test" / "hole"):
        target.mkdir(parents=True)
        for p in holes:
            shutil.copy(p, target / p.name)
    return {"folder": folder, "mvtec": mvtec}


def test_only_defects_read_alike_in_both_layouts(only_defects):
    for root in only_defects.values():
        dataset = open_dataset(root)
        assert dataset.train == [] and len(dataset.test) == 3
        assert all(s.is_defect and s.defect_type == "hole" for s in dataset.test)


def test_only_defects_evaluate_with_a_warning_in_both_layouts(only_defects, tmp_path, capsys):
    from conftest import write_png
    from flawscope.pipeline import Inspector

    goods = tmp_path / "goods"
    for i in range(4):
        write_png(goods / f"{i}.png", np.full((32, 32), 100 + i, np.uint8))
    model = Inspector.train(open_dataset(goods), "ncae", image_size=32, widths=[8, 16],
                            latent_channels=8, batch_size=8, epochs=1, progress=False,
                            device="cpu").save(tmp_path / "m.safetensors")
    results = {}
    for layout, root in only_defects.items():
        assert main(["evaluate", str(model), str(root), "--json", "--device", "cpu"]) == 0
        captured = capsys.readouterr()
        assert "the test set has only defect images" in captured.err, layout
        results[layout] = json.loads(captured.out)
    assert results["folder"]["n_images"] == results["mvtec"]["n_images"] == 3


def test_only_defects_fit_names_the_folder(only_defects, capsys):
    for root in only_defects.values():
        assert main(["fit", str(root), "--model", "ncae", "-o", str(root / "m.safetensors"),
                     *TINY]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"flawscope: error: {root}: no good training images found")


def test_empty_folder_layout_is_still_an_error(tmp_path):
    from flawscope.errors import DatasetError

    (tmp_path / "parts" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"parts: no images found for the folder layout"):
        open_dataset(tmp_path / "parts")
