"""The onnxruntime fast path: fit prepares a cached export, predict / evaluate / serve use it
by default with the same scores and verdicts as PyTorch, calibrate reuses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from flawscope.cli import main  # noqa: E402
from flawscope.errors import ConfigError  # noqa: E402
from flawscope.fastruntime import (  # noqa: E402
    cache_dir,
    cached_export,
    export_failure,
    model_key,
    select_runtime,
)
from flawscope.pipeline import Inspector  # noqa: E402
from flawscope.runtime import load_any_model  # noqa: E402

pytestmark = pytest.mark.slow  # real exports of a PatchCore graph

FIT = ["--model", "patchcore", "--image-size", "64", "--param", "coreset_ratio=0.1",
       "--batch-size", "8", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def prepared(synthetic_root, tmp_path_factory) -> tuple[Path, Path]:
    """(model file fitted with ``--prepare-runtime``, category root)."""
    root = synthetic_root / "tile"
    model = tmp_path_factory.mktemp("fast") / "tile.safetensors"
    assert main(["fit", str(root), "-o", str(model), *FIT, "--prepare-runtime"]) == 0
    return model, root


def _predict(capsys, model: Path, root: Path, *extra: str) -> tuple[list[dict], str]:
    assert main(["predict", str(model), str(root / "test"), "--json", *extra]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def test_fit_caches_the_graph_and_says_so(prepared, capsys):
    model, _ = prepared
    graph = cached_export(model)
    assert graph is not None and graph.parent == cache_dir()
    assert graph.name == f"{model_key(model)}.onnx"
    assert export_failure(model) is None


def test_predict_uses_onnxruntime_by_default_with_torch_scores(prepared, capsys):
    model, root = prepared
    fast, err = _predict(capsys, model, root)
    assert err.strip().splitlines()[-1].endswith("runtime onnxruntime")
    slow, err = _predict(capsys, model, root, "--runtime", "torch")
    assert err.strip().splitlines()[-1].endswith("runtime torch")
    a = np.array([p["score"] for p in fast])
    b = np.array([p["score"] for p in slow])
    assert len(a) == len(b) > 10
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert [p["verdict"] for p in fast] == [p["verdict"] for p in slow]
    assert [len(p["regions"]) for p in fast] == [len(p["regions"]) for p in slow]


def test_calibrate_reuses_the_graph_and_verdicts_follow_the_new_threshold(
        prepared, tmp_path, capsys):
    model, root = prepared
    loose = tmp_path / "loose.safetensors"
    assert main(["calibrate", str(model), "--max-frr", "0.3", "-o", str(loose)]) == 0
    assert "preparing" not in capsys.readouterr().err  # reused, not exported again
    assert cached_export(loose) is not None
    old, _ = _predict(capsys, model, root)
    new, err = _predict(capsys, loose, root)
    assert err.strip().splitlines()[-1].endswith("runtime onnxruntime")
    assert [p["score"] for p in new] == [p["score"] for p in old]
    # the verdicts come from the new model file's threshold, not from the graph's metadata
    threshold = Inspector.load(loose, device="cpu").threshold.value
    assert all(p["threshold"] == pytest.approx(threshold) for p in new)
    assert [p["verdict"] for p in new] == [
        "defect" if p["score"] > threshold else "ok" for p in new]
    assert threshold < old[0]["threshold"]


def test_evaluate_runs_in_onnxruntime_with_the_same_metrics(prepared, capsys):
    model, root = prepared
    results = []
    for runtime in ("auto", "torch"):
        assert main(["evaluate", str(model), str(root), "--json", "--quiet",
                     "--runtime", runtime]) == 0
        results.append(json.loads(capsys.readouterr().out))
    fast, slow = results
    for key in ("image_auroc", "pixel_auroc", "recall", "false_reject_rate"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-3), key


def test_serve_loads_the_fast_runtime(prepared):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from flawscope.serve import create_app

    model, _ = prepared
    with TestClient(create_app(model, device="cpu", db=None)) as client:
        assert client.get("/v1/model").json()["runtime"] == "onnxruntime"
    with TestClient(create_app(model, device="cpu", db=None, runtime="torch")) as client:
        assert client.get("/v1/model").json()["runtime"] == "torch"


def test_without_a_cached_graph_auto_is_torch_and_a_failure_is_remembered(
        prepared, tmp_path):
    model, _ = prepared
    other = tmp_path / "other.safetensors"
    inspector = Inspector.load(model, device="cpu").set_operating_point(0.2)
    inspector.save(other)
    assert cached_export(other) is None
    assert load_any_model(other, device="cpu").runtime == "torch"  # no export on predict
    marker = cache_dir() / f"{model_key(other)}.failed"
    marker.write_text("the exporter failed (test)", encoding="utf-8")
    # serve's prepare_missing does not retry a remembered failure: PyTorch, saying why
    loaded = load_any_model(other, device="cpu", prepare_missing=True)
    assert loaded.runtime == "torch" and cached_export(other) is None
    assert export_failure(other) == "the exporter failed (test)"
    marker.unlink()


def test_runtime_options_are_checked(prepared, tmp_path):
    model, _ = prepared
    with pytest.raises(ConfigError, match="--runtime 'tensorrt'"):
        select_runtime(Inspector.load(model, device="cpu"), model, "tensorrt")
    graph = cached_export(model)
    with pytest.raises(ConfigError, match="--runtime torch: .* is an ONNX export"):
        load_any_model(graph, device="cpu", runtime="torch")


def test_an_unwritable_cache_leaves_the_model_on_torch(prepared, tmp_path, monkeypatch,
                                                       caplog, capsys):
    model, _ = prepared
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("FLAWSCOPE_CACHE", str(blocker))
    monkeypatch.setenv("FLAWSCOPE_PREPARE_RUNTIME", "1")  # as serve runs outside the suite
    loaded = load_any_model(model, device="cpu", prepare_missing=True)
    assert loaded.runtime == "torch"
    assert "no onnxruntime graph" in caplog.text and "FLAWSCOPE_CACHE" in caplog.text
    with pytest.raises(ConfigError, match="--runtime onnxruntime: .*FLAWSCOPE_CACHE"):
        load_any_model(model, device="cpu", runtime="onnxruntime")
    out = tmp_path / "again.safetensors"
    assert main(["calibrate", str(model), "--max-frr", "0.2", "-o", str(out),
                 "--prepare-runtime"]) == 0
    assert "runs in PyTorch: no onnxruntime graph" in capsys.readouterr().err


def test_serve_exports_in_the_background_and_switches(prepared, tmp_path, monkeypatch):
    """A model without a cached graph: the service answers in PyTorch at once, exports in
    the background and then scores in onnxruntime, with the same scores."""
    pytest.importorskip("fastapi")
    import time

    from fastapi.testclient import TestClient

    from flawscope.serve import create_app

    model, root = prepared
    fresh = tmp_path / "fresh.safetensors"
    Inspector.load(model, device="cpu").set_operating_point(0.05).save(fresh)
    assert cached_export(fresh) is None
    monkeypatch.setenv("FLAWSCOPE_PREPARE_RUNTIME", "1")
    image = sorted((root / "test").rglob("*.png"))[0]

    def score(client) -> float:
        files = [("files", (image.name, image.read_bytes(), "image/png"))]
        return client.post("/v1/predict?heatmap=false", files=files).json()["results"][0][
            "score"]

    with TestClient(create_app(fresh, device="cpu", db=None)) as client:
        assert client.get("/v1/model").json()["runtime"] == "torch"
        before = score(client)
        deadline = time.monotonic() + 300
        while client.get("/v1/model").json()["runtime"] != "onnxruntime":
            assert time.monotonic() < deadline, "the background export did not finish"
            time.sleep(0.5)
        assert score(client) == pytest.approx(before, rel=1e-4, abs=1e-4)
    assert cached_export(fresh) is not None


def test_evaluate_takes_an_exported_onnx_file(prepared, capsys):
    model, root = prepared
    graph = cached_export(model)  # a flawscope .onnx export like `flawscope export` writes
    results = []
    for path in (graph, model):
        assert main(["evaluate", str(path), str(root), "--json", "--quiet"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    onnx, file = results
    for key in ("image_auroc", "pixel_auroc", "recall", "region_f1"):
        assert onnx[key] == pytest.approx(file[key], abs=1e-3), key
    # an export holds no calibration scores: no operating points (the model file has them)
    assert onnx["operating_points"]["points"] == [] and file["operating_points"]["points"]
    assert main(["evaluate", str(graph), str(root), "--quiet"]) == 0  # the table as text
    assert "image_auroc" in capsys.readouterr().out
    assert main(["evaluate", str(graph), str(root), "--statistics", "s.csv"]) == 2
    assert "is an ONNX export; residual statistics" in capsys.readouterr().err
