"""Classifier ONNX export: uint8 in, probabilities out, labels in the metadata, parity with
PyTorch, the OnnxClassifier runtime and the ``classify export`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import needs_ort
from flawscope.classify import AugmentPolicy, Classifier, ClassifierConfig, fit_classifier
from flawscope.classify.data import table_from_datasets
from flawscope.cli import main
from flawscope.errors import ModelFileError

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def model_file(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clf_export")
    table = table_from_datasets([synthetic_root])
    cfg = ClassifierConfig(
        backbone="test_efficientnet", weights="random", image_size=32, folds=2, epochs=1,
        batch_size=16, progress=False, cache_dir=str(tmp / "cache"), device="cpu",
        augment=AugmentPolicy(no_flip_classes=("tile",)), tta="flips",
        output_stride=16,  # dilated last stages go through the export too
    )
    with pytest.warns(UserWarning, match="RANDOM"):
        fit_classifier(table, cfg, output=tmp / "m.safetensors")
    return tmp / "m.safetensors"


@pytest.fixture(scope="module")
def exported(model_file, synthetic_root):
    from flawscope.classify.export import export_classifier_onnx

    images = sorted((synthetic_root / "washer" / "test").rglob("*.png"))[:6]
    out = model_file.with_suffix(".onnx")
    path, report = export_classifier_onnx(model_file, out, check_images=images)
    return path, report


@needs_ort
def test_graph_takes_uint8_and_returns_probabilities(exported, model_file) -> None:
    import onnx

    path, report = exported
    assert report.ok() and report.images >= 6 + 6
    proto = onnx.load(str(path))
    inp = proto.graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.shape.dim]
    assert dims[1:] == [3, 32, 32] and isinstance(dims[0], str)  # dynamic batch
    meta = {p.key: p.value for p in proto.metadata_props}
    clf = Classifier.load(model_file, device="cpu")
    assert json.loads(meta["labels"]) == clf.labels
    assert meta["kind"] == "classifier" and json.loads(meta["input_size"]) == [32, 32]
    assert meta["flawscope_format"] == "flawscope-onnx-classifier"
    assert json.loads(meta["augment"])["no_flip_classes"] == ["tile"]
    assert json.loads(meta["parity"])["max_abs"] <= 1e-4


@needs_ort
def test_onnx_classifier_matches_pytorch(exported, model_file, synthetic_root) -> None:
    from flawscope.classify.export import OnnxClassifier, load_classifier

    path, _ = exported
    paths = sorted(synthetic_root.rglob("test/*/*.png"))[:20]
    torch_clf = Classifier.load(model_file, device="cpu")
    ort_clf = load_classifier(path)
    assert isinstance(ort_clf, OnnxClassifier)
    assert ort_clf.labels == torch_clf.labels and ort_clf.image_size == (32, 32)
    assert ort_clf.config["tta"] == torch_clf.config["tta"] == "flips"  # the model's default
    for tta in ("none", "flips", None):
        p_t = torch_clf.predict_proba(paths, batch_size=7, tta=tta)
        p_o = ort_clf.predict_proba(paths, batch_size=5, tta=tta)
        assert p_o.shape == (len(paths), len(torch_clf.labels))
        np.testing.assert_allclose(p_o, p_t, atol=1e-4)
        np.testing.assert_allclose(p_o.sum(1), 1.0, atol=1e-5)
    rec_t, rec_o = torch_clf.classify(paths), ort_clf.classify(paths)
    assert [r["label"] for r in rec_o] == [r["label"] for r in rec_t]
    assert set(rec_o[0]) == {"label", "class", "state", "probability"}
    assert all(r["label"] == f"{r['class']}-{r['state']}" for r in rec_o)
    assert ort_clf.predict(paths[:3]) == torch_clf.predict(paths[:3])


@needs_ort
def test_cli_export_then_predict_and_evaluate_with_onnx(model_file, synthetic_root, tmp_path,
                                                        capsys) -> None:
    out = tmp_path / "clf.onnx"
    assert main(["classify", "export", str(model_file), "-o", str(out)]) == 0
    assert "written to" in capsys.readouterr().out and out.is_file()
    folder = synthetic_root / "washer" / "test"
    assert main(["classify", "predict", str(out), str(folder), "--json"]) == 0
    onnx_rows = json.loads(capsys.readouterr().out)
    assert main(["classify", "predict", str(model_file), str(folder), "--json", "--device",
                 "cpu"]) == 0
    torch_rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    np.testing.assert_allclose([r["confidence"] for r in onnx_rows],
                               [r["confidence"] for r in torch_rows], atol=1e-4)
    assert main(["classify", "evaluate", str(out), str(synthetic_root / "washer"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 44


@needs_ort
def test_parity_failure_writes_nothing(model_file, tmp_path, monkeypatch) -> None:
    from flawscope.classify import export as E

    monkeypatch.setattr(E, "PROBA_TOL", -1.0)  # nothing can pass
    out = tmp_path / "bad.onnx"
    with pytest.raises(E.ClassifierExportError, match="not written"):
        E.export_classifier_onnx(model_file, out)
    assert not out.exists() and not list(tmp_path.iterdir())


@needs_ort
def test_bad_onnx_files_are_named(tmp_path, capsys) -> None:
    from flawscope.classify.export import OnnxClassifier

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match="junk.onnx"):
        OnnxClassifier(junk)
    with pytest.raises(ModelFileError, match="no such model file"):
        OnnxClassifier(tmp_path / "missing.onnx")
    assert main(["classify", "predict", str(junk), str(tmp_path)]) == 2
    assert "junk.onnx" in capsys.readouterr().err
