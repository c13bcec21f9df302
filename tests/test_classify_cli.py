"""The ``flawscope classify`` CLI contract: fit / predict / evaluate / grid, and clean errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from flawscope.classify.data import table_from_datasets
from flawscope.cli import main
from flawscope.modelfile import load_model

TINY = ["--backbone", "test_efficientnet", "--weights", "random", "--image-size", "32",
        "--folds", "2", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dacon(synthetic_root, tmp_path_factory):
    """The synthetic images described by Dacon-style train.csv / test.csv (no label column)."""
    root = tmp_path_factory.mktemp("dacon")
    items = table_from_datasets([synthetic_root]).items
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "file_name", "class", "state"])
        for i, it in enumerate(items):
            rel = it.path.relative_to(synthetic_root)
            w.writerow([i, str(rel), it.object_class, it.state])
    with open(root / "test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "file_name"])
        for i, it in enumerate(items[:5]):
            w.writerow([20000 + i, str(it.path.relative_to(synthetic_root))])
    return root


@pytest.fixture(scope="module")
def model(dacon, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "clf.safetensors"
    args = ["classify", "fit", str(synthetic_root), "--csv", str(dacon / "train.csv"), "-o",
            str(out), *TINY, "--cache-dir", str(out.parent / "cache"), "--no-flip-classes",
            "tile,washer-hole"]
    with pytest.warns(UserWarning, match="RANDOM"):
        assert main(args) == 0
    return out


def test_fit_writes_model_log_and_oof(model, capsys) -> None:
    assert model.is_file()
    assert not model.with_name(model.name + ".ckpt").exists()
    log = model.with_suffix(".log.jsonl").read_text().splitlines()
    # the budget recipe: the two folds, then the refit on every image (no validation)
    records = [json.loads(x) for x in log]
    assert [(r["fold"], r["val_macro_f1"] is None) for r in records] == \
        [(0, False), (1, False), (2, True)]
    with open(model.with_suffix(".oof.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 88 and {r["fold"] for r in rows} == {"0", "1"}
    assert "p:tile-good" in rows[0] and rows[0]["prediction"]
    config, _ = load_model(model, kind="classifier")
    assert config["augment"]["no_flip_classes"] == ["tile", "washer-hole"]
    assert config["backbone"] == "test_efficientnet" and config["folds"] == 2
    assert config["members"] == ["refit"] and config["tta"] == "flips"


def test_predict_csv_writes_both_submissions(model, dacon, synthetic_root, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    args = ["classify", "predict", str(model), str(dacon / "test.csv"), "--image-dir",
            str(synthetic_root), "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    with open(out) as fh:
        sub = list(csv.reader(fh))
    assert sub[0] == ["index", "label"]
    assert [r[0] for r in sub[1:]] == [str(20000 + i) for i in range(5)]
    with open(tmp_path / "submission_files.csv") as fh:
        files = list(csv.DictReader(fh))
    assert list(files[0]) == ["index", "file_name", "label", "confidence"]
    assert files[0]["file_name"].endswith(".png") and files[0]["label"] == sub[1][1]


def test_predict_folder_json(model, synthetic_root, capsys) -> None:
    folder = synthetic_root / "washer" / "test" / "hole"
    assert main(["classify", "predict", str(model), str(folder), "--json", "--device",
                 "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 3 and {"index", "path", "label", "confidence"} <= set(out[0])


def test_evaluate_json_contract(model, synthetic_root, capsys) -> None:
    assert main(["classify", "evaluate", str(model), str(synthetic_root / "washer"), "--json",
                 "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {"macro_f1", "accuracy", "per_label_f1", "confusion_matrix", "labels"} <= set(m)
    assert m["n"] == 44 and 0 <= m["macro_f1"] <= 1
    assert sum(map(sum, m["confusion_matrix"])) == 44
    assert main(["classify", "evaluate", str(model), str(synthetic_root / "tile"), "--device",
                 "cpu"]) == 0
    text = capsys.readouterr().out
    assert "macro F1" in text and "confusion matrix" in text and "tile-crack" in text


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flawscope: error: "), err
    return err[0]


def test_errors_are_one_line(model, dacon, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,class\nx.png,cable\n")
    assert main(["classify", "fit", "--csv", str(bad), "-o", str(tmp_path / "m"), *TINY]) == 2
    assert "bad.csv: missing column(s) state" in _error(capsys)
    assert main(["classify", "evaluate", str(model), str(tmp_path / "nowhere"), "--csv",
                 str(dacon / "train.csv")]) == 2
    assert "does not exist" in _error(capsys)
    assert main(["classify", "predict", str(model), str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such file" in _error(capsys)
    assert main(["classify", "fit", "-o", str(tmp_path / "m"), *TINY]) == 2
    assert "no data given" in _error(capsys)
    assert main(["classify", "predict", str(dacon / "train.csv"), str(dacon / "test.csv")]) == 2
    assert "not a flawscope model file" in _error(capsys)


def test_unknown_label_in_evaluation(model, synthetic_root, dacon, tmp_path, capsys) -> None:
    other = tmp_path / "other.csv"
    with open(dacon / "test.csv") as fh:
        rows = list(csv.DictReader(fh))
    other.write_text("file_name,label\n" + "\n".join(f"{r['file_name']},screw-thread"
                                                     for r in rows))
    assert main(["classify", "evaluate", str(model), str(synthetic_root), "--csv",
                 str(other)]) == 2
    assert "screw-thread" in _error(capsys)


def test_grid_writes_the_ablation_table_and_resumes(synthetic_root, tmp_path, capsys,
                                                    monkeypatch) -> None:
    out = tmp_path / "grid"
    args = ["classify", "grid", str(synthetic_root), "-o", str(out), *TINY,
            "--cache-dir", str(tmp_path / "cache"), "--factors", "cv,flip,optimizer",
            "--cv-folds", "1", "--flip-policies", "none", "--optimizers", "adam", "--refits", "2"]
    with pytest.warns(UserWarning):
        assert main(args) == 0
    table = capsys.readouterr().out
    rows = json.loads((out / "grid.json").read_text())
    assert [r["run"] for r in rows] == ["base", "folds=1", "flip=none", "optimizer=adam"]
    for r in rows:
        assert 0 <= r["test_macro_f1"] <= 1 and r["fit_seconds"] > 0 and r["n_test"] > 0
    assert rows[1]["folds"] == 1 and rows[2]["flip"] == "none" and rows[3]["optimizer"] == "adam"
    # variants from the same models: the budget recipe's model is folds + refit, without TTA
    v = rows[0]["test_variants"]
    assert set(v) == {f"{m}tta_{t}" for m in ("", "folds+", "refit+", "folds+refit+", "refit0+")
                      for t in ("none", "flips", "dihedral")}
    assert v["tta_none"] == v["folds+refit+tta_none"] == rows[0]["test_macro_f1"]
    assert "tta_flips" not in rows[2]["test_variants"]  # trained without flips
    assert "| base |" in table and (out / "grid.md").read_text() == table
    assert (out / "grid.csv").read_text().startswith("run,backbone,folds,flip,optimizer")

    import flawscope.classify.grid as G

    def no_training(*a, **k):
        raise AssertionError("finished runs must be read back")

    monkeypatch.setattr(G, "fit_classifier", no_training)
    assert main(args) == 0


def test_grid_without_variants_keeps_per_label_results(synthetic_root, tmp_path, capsys):
    out = tmp_path / "grid"
    args = ["classify", "grid", str(synthetic_root), "-o", str(out), *TINY,
            "--cache-dir", str(tmp_path / "cache"), "--factors", "", "--no-variants"]
    with pytest.warns(UserWarning):
        assert main(args) == 0
    (row,) = json.loads((out / "grid.json").read_text())
    assert "test_variants" not in row
    labels = sorted(table_from_datasets([synthetic_root]).counts())
    assert set(row["oof_per_label_f1"]) <= set(labels)  # per-label F1 of the two folds
    cm = np.array(row["test_confusion_matrix"])
    assert cm.shape == (len(labels), len(labels)) and cm.sum() == row["n_test"]
    assert np.trace(cm) / cm.sum() == pytest.approx(row["test_accuracy"])
