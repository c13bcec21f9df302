"""The service with a class + state classifier next to the detector (``serve --classifier``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import needs_ort
from flawscope.classify import AugmentPolicy, Classifier, ClassifierConfig, fit_classifier  # noqa: E402
from flawscope.classify.data import table_from_datasets  # noqa: E402
from flawscope.cli import main  # noqa: E402
from flawscope.data.dataset import open_dataset  # noqa: E402
from flawscope.errors import ModelFileError  # noqa: E402
from flawscope.pipeline import Inspector  # noqa: E402
from flawscope.serve import create_app  # noqa: E402
from flawscope.serve.app import decode_upload, decode_upload_views  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: the detector: gray, 32 px; the classifier: RGB, 40 px (both views differ from each other)
DETECTOR = {"image_size": 32, "widths": [8, 16], "latent_channels": 8, "batch_size": 8,
            "epochs": 1, "progress": False, "device": "cpu"}
CLF_SIZE = 40


@pytest.fixture(scope="module")
def detector_path(synthetic_root, tmp_path_factory) -> Path:
    inspector = Inspector.train(open_dataset(synthetic_root / "tile"), "ncae", **DETECTOR)
    return inspector.save(tmp_path_factory.mktemp("serve-clf") / "tile.safetensors")


@pytest.fixture(scope="module")
def classifier_path(synthetic_root, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve-clf-model")
    cfg = ClassifierConfig(
        backbone="test_efficientnet", weights="random", image_size=CLF_SIZE, folds=2,
        epochs=1, batch_size=16, progress=False, cache_dir=str(tmp / "cache"), device="cpu",
        augment=AugmentPolicy(no_flip_classes=("tile",)),
    )
    with pytest.warns(UserWarning, match="RANDOM"):
        fit_classifier(table_from_datasets([synthetic_root]), cfg,
                       output=tmp / "parts.safetensors")
    return tmp / "parts.safetensors"


@pytest.fixture(scope="module")
def images(synthetic_root) -> list[Path]:
    """Gray tile and colour washer images, good and defect."""
    return [*sorted((synthetic_root / "tile" / "test").rglob("*.png"))[::4],
            *sorted((synthetic_root / "washer" / "test").rglob("*.png"))[::4]]


@pytest.fixture(scope="module")
def client(detector_path, classifier_path):
    app = create_app(detector_path, classifier=classifier_path, workers=1, device="cpu")
    with TestClient(app) as c:
        yield c


def upload(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_each_result_has_the_classifiers_label(client, classifier_path, detector_path, images):
    r = client.post("/v1/predict", files=upload(*images))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    clf = Classifier.load(classifier_path, device="cpu")
    expected = clf.classify(images)
    proba = clf.predict_proba(images)
    assert len({e["class"] for e in expected}) >= 1 and len(results) == len(images) >= 6
    for res, exp, row in zip(results, expected, proba):
        got = res["classification"]
        assert (got["label"], got["class"], got["state"]) == (
            exp["label"], exp["class"], exp["state"]), res["file"]
        assert got["probability"] == pytest.approx(exp["probability"], abs=1e-5)
        # top-3 by default, highest first, the first is the label
        order = np.argsort(-row)[:3]
        assert [t["label"] for t in got["top"]] == [clf.labels[j] for j in order]
        np.testing.assert_allclose([t["probability"] for t in got["top"]], row[order],
                                   atol=1e-5)
    # the detector's answer is unchanged by the classifier
    ref = Inspector.load(detector_path, device="cpu").predict(images)
    for res, p in zip(results, ref):
        assert res["verdict"] == p.verdict
        assert res["score"] == pytest.approx(p.score, rel=1e-5, abs=1e-7)


def test_top_k_query(client, classifier_path, images):
    n_labels = len(Classifier.load(classifier_path, device="cpu").labels)
    r = client.post("/v1/predict?top_k=0&heatmap=false", files=upload(images[0]))
    assert r.json()["results"][0]["classification"]["top"] == []
    r = client.post("/v1/predict?top_k=1000&heatmap=false", files=upload(images[0]))
    top = r.json()["results"][0]["classification"]["top"]
    assert len(top) == n_labels
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-4)
    assert client.post("/v1/predict?top_k=-1", files=upload(images[0])).status_code == 422


def test_model_info_has_a_classifier_section(client, classifier_path):
    clf = Classifier.load(classifier_path, device="cpu")
    m = client.get("/v1/model").json()
    assert m["model"] == "ncae" and m["input_size"] == [32, 32]
    c = m["classifier"]
    assert c["runtime"] == "torch" and c["backbone"] == "test_efficientnet"
    assert c["labels"] == clf.labels and c["input_size"] == [CLF_SIZE, CLF_SIZE]
    assert c["channels"] == 3 and c["folds"] == 2
    assert c["classes"] == ["tile", "washer"]
    spec = client.get("/openapi.json").json()["components"]["schemas"]
    assert "class" in spec["Classification"]["properties"]
    assert "classification" in spec["ImageResult"]["properties"]


def test_without_a_classifier_nothing_changes(detector_path, images):
    with TestClient(create_app(detector_path, workers=1, device="cpu")) as c:
        res = c.post("/v1/predict", files=upload(images[0])).json()["results"][0]
        assert res["classification"] is None
        assert c.get("/v1/model").json()["classifier"] is None


def test_decode_views_match_separate_decoding(images):
    for path in images[:1] + images[-1:]:  # gray and colour
        data = path.read_bytes()
        views, original = decode_upload_views(data, path.name, [(1, (32, 32)), (3, (40, 24))],
                                               max_pixels=10**7)
        for (c, size), got in zip([(1, (32, 32)), (3, (40, 24))], views):
            ref, ref_original = decode_upload(data, path.name, channels=c, size=size,
                                              max_pixels=10**7)
            assert got.shape == (*size, c) and ref_original == original
            np.testing.assert_array_equal(got, ref)


def test_a_bad_classifier_file_refuses_to_start(detector_path, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    for bad in (junk, detector_path, tmp_path / "missing.safetensors"):
        with pytest.raises(ModelFileError, match="--classifier") as info:
            create_app(detector_path, classifier=bad, device="cpu")
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert main(["serve", str(detector_path), "--classifier", str(junk), "--port", "0",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(junk) in err[0] and "--classifier" in err[0], err


def test_predict_and_serve_refuse_a_classifier_as_the_detector(classifier_path, images,
                                                               capsys):
    assert main(["predict", str(classifier_path), str(images[0]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flawscope classify predict" in err[0], err
    assert str(classifier_path) in err[0]
    with pytest.raises(ModelFileError, match="--classifier"):
        create_app(classifier_path, device="cpu")
    out = classifier_path.with_name("parts.onnx")
    assert main(["export", str(classifier_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"`flawscope classify export {classifier_path} -o {out}`" in err[0]
    assert not out.exists()


@needs_ort
def test_serve_the_exported_classifier(detector_path, classifier_path, images, tmp_path,
                                       capsys):
    from flawscope.classify.export import export_classifier_onnx

    onnx_path, _ = export_classifier_onnx(classifier_path, tmp_path / "parts.onnx")
    with TestClient(create_app(detector_path, classifier=onnx_path, device="cpu")) as c:
        got = [r["classification"] for r in
               c.post("/v1/predict?heatmap=false", files=upload(*images)).json()["results"]]
        info = c.get("/v1/model").json()["classifier"]
    with TestClient(create_app(detector_path, classifier=classifier_path, device="cpu")) as c:
        ref = [r["classification"] for r in
               c.post("/v1/predict?heatmap=false", files=upload(*images)).json()["results"]]
    assert info["runtime"] == "onnxruntime" and info["folds"] == 2
    assert info["input_size"] == [CLF_SIZE, CLF_SIZE] and info["backbone"] == "test_efficientnet"
    for g, r in zip(got, ref):
        assert g["label"] == r["label"] and g["state"] == r["state"]
        assert g["probability"] == pytest.approx(r["probability"], abs=1e-4)
    # `flawscope predict` with the exported classifier points to `classify predict` too
    assert main(["predict", str(onnx_path), str(images[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flawscope classify predict" in err[0], err
