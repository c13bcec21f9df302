"""Classifier additions: MVTec -> Dacon CSV, class distribution chart, flip rule as data,
the cpu recipe (head warm-up, cosine schedule), and test-time augmentation."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from flawscope.classify import AugmentPolicy, Classifier, ClassifierConfig, fit_classifier
from flawscope.classify.config import DOCUMENT_MIN_EPOCHS, RECIPES, choose_recipe, lr_factor
from flawscope.classify.data import read_label_csv, table_from_datasets, write_label_csv
from flawscope.classify.describe import flip_table
from flawscope.classify.folds import head_parameters, new_model, set_body_frozen
from flawscope.classify.plots import label_distribution, write_label_distribution
from flawscope.classify.tta import (
    flip_views,
    prediction_records,
    supported_tta,
    tta_proba,
    tta_views,
)
from flawscope.cli import build_parser, main
from flawscope.cli import classify as cli_classify
from flawscope.errors import ConfigError
from flawscope.modelfile import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    """bottle (good, broken_large) and pill (good, crack), with masks that must not be listed."""
    root = tmp_path_factory.mktemp("mvtec") / "mvtec_ad"
    layout = {"bottle": {"train/good": 3, "test/good": 2, "test/broken_large": 2},
              "pill": {"train/good": 2, "test/good": 1, "test/crack": 3}}
    k = 0
    for cat, dirs in layout.items():
        for d, n in dirs.items():
            for i in range(n):
                _png(root / cat / d / f"{i:03d}.png", k)
                k += 1
                if "test/" in d and not d.endswith("good"):
                    _png(root / cat / "ground_truth" / d.split("/")[1] / f"{i:03d}_mask.png", 0)
    return root


# ------------------------------------------------------------------------------- make-csv
def test_make_csv_lists_every_image_with_class_state_label(mvtec, tmp_path, capsys) -> None:
    out = tmp_path / "csv" / "train.csv"
    assert main(["classify", "make-csv", str(mvtec / "bottle"), str(mvtec / "pill"), "-o",
                 str(out)]) == 0
    assert "13 images, 4 labels" in capsys.readouterr().out
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["index", "file_name", "class", "state", "label"]
    assert [r["index"] for r in rows] == [str(i) for i in range(13)]
    labels = {r["label"] for r in rows}
    assert labels == {"bottle-good", "bottle-broken_large", "pill-good", "pill-crack"}
    assert all(r["label"] == f"{r['class']}-{r['state']}" for r in rows)
    assert sum(r["label"] == "bottle-good" for r in rows) == 5  # train/good + test/good
    assert not any("ground_truth" in r["file_name"] or "mask" in r["file_name"] for r in rows)
    assert rows[0]["file_name"].startswith("../")  # relative to the CSV's folder
    # the reader finds the images without an image folder, with the same labels
    table = read_label_csv(out)
    assert len(table) == 13 and table.labels == sorted(labels)
    assert {it.path.resolve() for it in table.items} == \
        {p.resolve() for p in mvtec.rglob("*.png") if "ground_truth" not in str(p)}


def test_make_csv_image_root_and_absolute(mvtec, tmp_path) -> None:
    rel = tmp_path / "rel.csv"
    assert main(["classify", "make-csv", str(mvtec), "-o", str(rel), "--image-root",
                 str(mvtec)]) == 0  # an MVTec root: every category
    first = rel.read_text().splitlines()[1].split(",")
    assert first[1].startswith("bottle/") and not first[1].startswith("/")
    assert len(read_label_csv(rel, mvtec)) == 13
    ab = tmp_path / "abs.csv"
    assert main(["classify", "make-csv", str(mvtec / "pill"), "-o", str(ab), "--absolute"]) == 0
    names = [r.split(",")[1] for r in ab.read_text().splitlines()[1:]]
    assert len(names) == 6 and all(n.startswith("/") for n in names)


def test_make_csv_errors_name_the_folder(tmp_path, capsys) -> None:
    assert main(["classify", "make-csv", str(tmp_path / "nowhere"), "-o",
                 str(tmp_path / "x.csv")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_write_label_csv_refuses_a_folder(mvtec, tmp_path) -> None:
    table = table_from_datasets([mvtec / "pill"])
    with pytest.raises(ConfigError, match="is a folder"):
        write_label_csv(tmp_path, table)
    with pytest.raises(ConfigError, match="--image-root"):
        write_label_csv(tmp_path / "x.csv", table, tmp_path / "missing")


# ------------------------------------------------------------------------------- chart + flips
def test_label_distribution_chart_has_one_bar_per_label(tmp_path) -> None:
    counts = {"bottle-good": 9, "bottle-broken_large": 2, "pill-good": 5, "pill-crack": 1,
              "metal_nut-flip": 3}
    dist = write_label_distribution(tmp_path / "c.png", counts)
    assert dist.path.read_bytes()[:8] == PNG_MAGIC and dist.png[:8] == PNG_MAGIC
    assert dist.bars == len(counts) == len(dist.labels)
    assert dict(zip(dist.labels, dist.counts)) == counts
    # grouped by class, good first within a class
    assert dist.labels[:2] == ["bottle-good", "bottle-broken_large"]
    assert dist.classes == ["bottle", "bottle", "metal_nut", "pill", "pill"]
    with pytest.raises(ValueError, match="no labels to plot"):
        label_distribution({})


def test_flip_table_shows_the_rule_as_data(mvtec) -> None:
    table = table_from_datasets([mvtec])
    rows = {r["class"]: r for r in flip_table(table, AugmentPolicy(no_flip_classes=("pill",)))}
    assert rows["pill"]["flips"].startswith("no") and rows["bottle"]["flips"] == "yes"
    assert rows["bottle"]["images"] == 7 and rows["pill"]["labels"] == 2
    part = {r["class"]: r["flips"] for r in flip_table(
        table, AugmentPolicy(no_flip_classes=("pill-crack",)))}
    assert part["pill"] == "partly (not pill-crack)"
    off = flip_table(table, AugmentPolicy().with_flip_policy("none"))
    assert all(r["flips"].startswith("no (policy") for r in off)


def test_describe_data_json_and_chart(mvtec, tmp_path, capsys) -> None:
    png = tmp_path / "dist.png"
    assert main(["classify", "describe-data", str(mvtec), "-o", str(png), "--json",
                 "--no-flip-classes", "pill"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"] == {"bottle-broken_large": 2, "bottle-good": 5, "pill-crack": 3,
                             "pill-good": 3}
    assert out["no_flip_classes"] == ["pill"] and png.read_bytes()[:8] == PNG_MAGIC
    assert {r["class"]: r["flips"] for r in out["flips"]}["pill"].startswith("no")


# ------------------------------------------------------------------------------- recipes
def test_document_recipe_is_the_defaults_and_cpu_recipe_overrides() -> None:
    doc = ClassifierConfig.from_recipe("document")
    assert doc == ClassifierConfig()
    assert (doc.backbone, doc.image_size, doc.epochs, doc.optimizer, doc.lr_schedule) == \
        ("efficientnet_b4", 384, 70, "adadelta", "constant")
    cpu = ClassifierConfig.from_recipe("cpu", image_size=128)
    assert cpu.recipe == "cpu" and cpu.image_size == 128  # explicit option wins
    assert cpu.backbone == "tf_efficientnet_lite0" and cpu.optimizer == "adamw"
    assert cpu.lr_schedule == "cosine" and cpu.freeze_epochs == 1
    assert cpu.training_dict()["recipe"] == "cpu"
    assert set(RECIPES) == set(cli_classify.RECIPE_NAMES)
    with pytest.raises(ConfigError, match="--recipe gpu"):
        ClassifierConfig.from_recipe("gpu")


def _cli_config(*argv: str) -> ClassifierConfig:
    args = build_parser().parse_args(["classify", "fit", "x", "-o", "m", *argv])
    return cli_classify._config(args)


def test_auto_recipe_is_the_budget_one_without_gpu_or_with_few_epochs(monkeypatch) -> None:
    import torch

    import flawscope.classify.config as config

    assert choose_recipe("document", epochs=5)[0] == "document"  # explicit wins
    assert choose_recipe("auto", epochs=8)[0] == "cpu"
    monkeypatch.setattr(config, "resolve_device", lambda d: torch.device("cpu"))
    assert choose_recipe("auto", epochs=None) == ("cpu", "auto: no GPU, the budget recipe")
    monkeypatch.setattr(config, "resolve_device", lambda d: torch.device("cuda"))
    assert choose_recipe("auto", epochs=None)[0] == "document"
    assert choose_recipe("auto", epochs=DOCUMENT_MIN_EPOCHS)[0] == "document"
    assert choose_recipe("auto", epochs=DOCUMENT_MIN_EPOCHS - 1)[0] == "cpu"


def test_cli_recipe_and_explicit_options() -> None:
    # the acceptance budget of a new user on a CPU: the budget recipe without asking for it
    budget = _cli_config("--folds", "2", "--epochs", "8", "--image-size", "192")
    assert (budget.recipe, budget.optimizer, budget.backbone, budget.batch_size) == \
        ("cpu", "adamw", "tf_efficientnet_lite0", 16)
    assert (budget.sampler, budget.class_weight, budget.refit, budget.tta) == \
        ("balanced", "none", "replace", "flips")
    assert _cli_config("--sampler", "shuffle", "--class-weight", "balanced").sampler == "shuffle"
    doc = _cli_config("--recipe", "document")
    assert doc.training_dict() == ClassifierConfig().training_dict()
    cpu = _cli_config("--recipe", "cpu", "--epochs", "2", "--image-size", "128")
    assert (cpu.epochs, cpu.image_size, cpu.backbone, cpu.learning_rate) == \
        (2, 128, "tf_efficientnet_lite0", 1e-3)
    assert cpu.augment.rot90 and cpu.augment.no_flip_classes == ("metal_nut",)
    # another optimizer than the recipe's takes its own default rate and decay
    adam = _cli_config("--recipe", "cpu", "--optimizer", "adam")
    assert adam.learning_rate is None and adam.weight_decay is None
    assert _cli_config("--recipe", "cpu", "--optimizer", "adam", "--lr", "0.01") \
        .learning_rate == 0.01
    assert _cli_config("--recipe", "cpu", "--augment", "document").augment == AugmentPolicy()
    with pytest.raises(ConfigError, match="--freeze-epochs 3"):
        _cli_config("--recipe", "document", "--epochs", "3", "--freeze-epochs", "3")
    one = _cli_config("--recipe", "cpu", "--epochs", "1")  # the recipe's warm-up gives way
    assert one.freeze_epochs == 0 and one.epochs == 1
    extra = _cli_config("--pooling", "max", "--backbone-lr-scale", "0.2", "--refit", "add",
                        "--output-stride", "16")
    assert (extra.pooling, extra.backbone_lr_scale, extra.refit, extra.output_stride) == (
        "max", 0.2, "add", 16)


def test_recipe_warm_up_gives_way_under_torchrun(monkeypatch) -> None:
    assert _cli_config("--epochs", "8").freeze_epochs == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: the head warm-up is one process only
    assert _cli_config("--epochs", "8").freeze_epochs == 0
    assert ClassifierConfig.from_recipe("cpu").freeze_epochs == 0  # the library too
    # asked for explicitly: kept (and refused by the trainer under torchrun, with the reason)
    assert _cli_config("--epochs", "8", "--freeze-epochs", "1").freeze_epochs == 1


def test_cosine_schedule() -> None:
    assert lr_factor("constant", 0.7) == 1.0
    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 1.0) == pytest.approx(0.0)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert math.isclose(lr_factor("cosine", 2.0), 0.0, abs_tol=1e-12)


def test_head_warm_up_freezes_all_but_the_head(tmp_path) -> None:
    cfg = ClassifierConfig(backbone="test_efficientnet", weights="random", image_size=32)
    with pytest.warns(UserWarning, match="RANDOM"):
        model, _ = new_model(cfg, 3, 0)
    head = head_parameters(model)
    assert head and len(head) < len(list(model.parameters()))
    set_body_frozen(model, True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head
    set_body_frozen(model, False)
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def warm_fit(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    table = table_from_datasets([synthetic_root])
    cfg = ClassifierConfig.from_recipe(
        "cpu", backbone="test_efficientnet", weights="random", image_size=32, folds=2,
        epochs=3, batch_size=16, progress=False, cache_dir=str(tmp / "cache"), device="cpu",
        augment=AugmentPolicy(affine_degrees=0.0, rotation=(0.0, 0.0),
                              no_flip_classes=("tile",)), tta="dihedral",
    )
    with pytest.warns(UserWarning, match="RANDOM"):
        result = fit_classifier(table, cfg, output=tmp / "m.safetensors")
    return result, tmp / "m.safetensors", table


def test_cpu_recipe_trains_with_warm_up_and_cosine(warm_fit) -> None:
    result, path, _ = warm_fit
    fold0 = [r for r in result.history if r["fold"] == 0]
    assert [r["frozen_body"] for r in fold0] == [True, False, False]
    lrs = [r["lr"] for r in fold0]
    assert lrs[0] > lrs[1] > lrs[2] > 0 and lrs[0] <= 1e-3
    config, _ = load_model(path, kind="classifier")
    assert config["training"]["recipe"] == "cpu"
    assert config["training"]["lr_schedule"] == "cosine"
    assert config["augment"]["no_flip_classes"] == ["tile"]


# ------------------------------------------------------------------------------- TTA
def test_tta_views_follow_the_training_flips() -> None:
    config = {"labels": ["a-good", "a-bad"], "label_classes": {},
              "augment": {"hflip": 0.5, "vflip": 0.5, "no_flip_classes": []}}
    calls: list[np.ndarray] = []

    def proba(x: np.ndarray) -> np.ndarray:
        calls.append(x.copy())
        p = (x[:, 0, 0, 0] / 255.0).astype(np.float32)  # depends on the top-left pixel
        return np.stack([p, 1 - p], axis=1)

    x = np.zeros((1, 3, 4, 4), np.uint8)
    x[0, :, 0, 0] = 255
    assert tta_proba(proba, x, "none", config)[0, 0] == 1.0 and len(calls) == 1
    calls.clear()
    p = tta_proba(proba, x, "flips", config)
    assert len(calls) == 4  # identity, h, v, h+v
    assert np.array_equal(calls[1], x[..., ::-1]) and np.array_equal(calls[2], x[..., ::-1, :])
    np.testing.assert_allclose(p[0], [0.25, 0.75])  # only the identity view keeps the pixel
    assert flip_views({"hflip": 0.5, "vflip": 0.0}) == [(False, False), (True, False)]
    assert flip_views({"hflip": 0.5, "vflip": 0.5, "enabled": False}) == [(False, False)]
    with pytest.raises(ConfigError, match="trained without flips"):
        tta_proba(proba, x, "flips", {**config, "augment": {"hflip": 0, "vflip": 0}})
    with pytest.raises(ConfigError, match="--tta rotate"):
        tta_proba(proba, x, "rotate", config)


def test_dihedral_tta_averages_the_eight_symmetries_of_a_square() -> None:
    config = {"labels": ["a-good", "a-bad"], "label_classes": {}, "image_size": [4, 4],
              "augment": {"hflip": 0.5, "vflip": 0.5, "rot90": True, "no_flip_classes": []}}
    calls: list[np.ndarray] = []

    def proba(x: np.ndarray) -> np.ndarray:
        calls.append(x.copy())
        p = (x[:, 0, 0, 1] / 255.0).astype(np.float32)  # one pixel off the diagonal
        return np.stack([p, 1 - p], axis=1)

    x = np.zeros((1, 3, 4, 4), np.uint8)
    x[0, :, 0, 1] = 255
    p = tta_proba(proba, x, "dihedral", config)
    group = [np.rot90(m, k, axes=(-2, -1)) for m in (x, x[..., ::-1]) for k in range(4)]
    assert sorted(c.tobytes() for c in calls) == sorted(g.tobytes() for g in group)
    np.testing.assert_allclose(p[0], [1 / 8, 7 / 8])  # the pixel stays put in one view only
    for augment, match in (({"hflip": 0.5, "vflip": 0.5}, "quarter turns"),
                           ({"hflip": 0.5, "vflip": 0.0, "rot90": True}, "quarter turns")):
        with pytest.raises(ConfigError, match=match):
            tta_proba(proba, x, "dihedral", {**config, "augment": augment})
    with pytest.raises(ConfigError, match="not square"):
        tta_proba(proba, x, "dihedral", {**config, "image_size": [4, 8]})


def test_tta_keeps_plain_probabilities_for_no_flip_predictions() -> None:
    labels = ["bottle-good", "metal_nut-flip", "metal_nut-good"]
    config = {"labels": labels, "label_classes": {},
              "augment": {"hflip": 0.5, "vflip": 0.5, "no_flip_classes": ["metal_nut"]}}

    def proba(x: np.ndarray) -> np.ndarray:
        plain = x[:, 0, 0, 0] == 200  # marker in the top-left corner: an unflipped view
        nut = x[:, 0].reshape(len(x), -1).sum(1) > 300  # the second image has more ink
        out = np.empty((len(x), 3), np.float32)
        out[nut & plain] = [0.0, 0.1, 0.9]
        out[nut & ~plain] = [0.0, 0.9, 0.1]  # a flipped nut looks like the defect "flip"
        out[~nut & plain] = [1.0, 0.0, 0.0]
        out[~nut & ~plain] = [0.6, 0.2, 0.2]
        return out

    x = np.zeros((2, 3, 4, 4), np.uint8)
    x[:, :, 0, 0] = 200
    x[1, :, 2, 2] = 150
    p = tta_proba(proba, x, "flips", config)
    np.testing.assert_allclose(p[1], [0.0, 0.1, 0.9])  # metal_nut: never flipped
    np.testing.assert_allclose(p[0], [0.7, 0.15, 0.15], rtol=1e-6)  # bottle: mean of 4 views
    recs = prediction_records(p, labels, {})
    assert recs[1] == {"label": "metal_nut-good", "class": "metal_nut", "state": "good",
                       "probability": pytest.approx(0.9)}


def test_supported_tta_keeps_the_strongest_the_training_allows() -> None:
    full = {"hflip": 0.5, "vflip": 0.5, "rot90": True}
    assert supported_tta("dihedral", full, (8, 8)) == "dihedral"
    assert supported_tta("dihedral", full, (8, 16)) == "flips"  # not square
    assert supported_tta("dihedral", {"hflip": 0.5, "vflip": 0.5}, (8, 8)) == "flips"
    assert supported_tta("flips", full, (8, 8)) == "flips"
    assert supported_tta("dihedral", {"hflip": 0.0, "vflip": 0.0}, (8, 8)) == "none"
    assert supported_tta("none", full, (8, 8)) == "none"


def test_model_applies_its_own_tta_unless_told(warm_fit) -> None:
    result, path, table = warm_fit
    clf = Classifier.load(path, device="cpu")
    config, _ = load_model(path, kind="classifier")
    # dihedral asked for, degraded to what this model's augmentation (no quarter turns) allows
    expected = supported_tta("dihedral", config["augment"], (32, 32))
    assert config["tta"] == expected == "flips"
    paths = table.paths[::11]
    np.testing.assert_allclose(clf.predict_proba(paths), clf.predict_proba(paths, tta=expected),
                               atol=1e-7)
    views: list[int] = []
    real = clf.predict_proba_from_pixels
    clf.predict_proba_from_pixels = lambda x: views.append(len(x)) or real(x)
    clf.predict_proba(paths[:2])
    assert len(views) == len(tta_views(expected, config["augment"])) > 1


def test_classifier_tta_matches_manual_flip_average(warm_fit, synthetic_root) -> None:
    result, path, table = warm_fit
    clf = Classifier.load(path, device="cpu")
    assert clf.config["augment"]["no_flip_classes"] == ["tile"]
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))).transpose(2, 0, 1)
                       for p in table.paths[::8]])
    plain = clf.predict_proba(images, tta="none")
    tta = clf.predict_proba(images, tta="flips")
    views = [images, images[..., ::-1], images[..., ::-1, :], images[..., ::-1, ::-1]]
    manual = np.mean([clf.predict_proba(np.ascontiguousarray(v), tta="none") for v in views],
                     axis=0)
    tile = np.array([clf.labels[i].startswith("tile") for i in plain.argmax(1)])
    np.testing.assert_allclose(tta[~tile], manual[~tile], atol=1e-6)
    np.testing.assert_allclose(tta[tile], plain[tile], atol=1e-6)
    recs = clf.classify(images[:2], tta="flips")
    assert [r["label"] for r in recs] == [clf.labels[i] for i in tta[:2].argmax(1)]
    assert {r["class"] for r in recs} <= {"tile", "washer"}


def test_fit_cli_prints_config_and_flip_table_and_writes_chart(synthetic_root, tmp_path,
                                                               capsys) -> None:
    out = tmp_path / "m.safetensors"
    args = ["classify", "fit", str(synthetic_root), "-o", str(out), "--recipe", "cpu",
            "--backbone", "test_efficientnet", "--weights", "random", "--image-size", "32",
            "--folds", "2", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
            "--quiet", "--cache-dir", str(tmp_path / "cache"), "--no-flip-classes", "washer",
            "--json"]
    with pytest.warns(UserWarning, match="RANDOM"):
        assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["recipe"] == "cpu" and summary["no_flip_classes"] == ["washer"]
    # the budget recipe's model is the one trained on every image, with flip TTA; the folds
    # give the out-of-fold estimate
    assert summary["members"] == ["refit"] and summary["tta"] == "flips"
    assert summary["refit"]["n_train"] == 88 and summary["refit"]["epochs_run"] == 2
    assert "recipe" in captured.err and "cosine" in captured.err
    flips = [ln.split() for ln in captured.err.splitlines() if ln.strip().startswith("washer")]
    assert flips and flips[0][3] == "no"
    chart = out.with_suffix(".classes.png")
    assert summary["plot"] == str(chart) and chart.read_bytes()[:8] == PNG_MAGIC
    torch.manual_seed(0)
    # the TTA option reaches predict
    assert main(["classify", "predict", str(out), str(synthetic_root / "tile" / "test"),
                 "--json", "--tta", "flips", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(0 < r["confidence"] <= 1 for r in rows)


def test_run_configuration_rows_name_the_model_members() -> None:
    from flawscope.classify.describe import config_rows

    rows = dict(config_rows(_cli_config("--folds", "2", "--epochs", "8", "--refits", "2",
                                        "--output-stride", "16")))
    assert rows["model / test-time augmentation"] == "2 models on every image / flips"
    assert rows["pooling / output stride"] == "avg / 16"
    assert rows["loss weights / sampler / label smoothing / normalization"] == \
        "none / balanced / 0 / backbone"
    doc = dict(config_rows(_cli_config("--recipe", "document")))
    assert doc["model / test-time augmentation"] == "the 5 fold model(s) / none"
