"""Two-stage inspection: the defect-type split, region crops, naming the type of rejected
parts (library and CLI), and the type report."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import needs_ort, shared_data, write_png
from flawscope.classify.config import ClassifierConfig
from flawscope.classify.data import cache_key, cached_pixels, crop_pixels
from flawscope.classify.tta import tta_proba
from flawscope.cli import main
from flawscope.data.dataset import Sample, open_dataset
from flawscope.errors import ConfigError, DatasetError
from flawscope.modelfile import load_model
from flawscope.pipeline import Inspector, Prediction
from flawscope.regions import Region
from flawscope.threshold import Threshold
from flawscope.twostage import (
    TYPE_TRAIN_FRACTION,
    defect_type_table,
    mask_box,
    name_defects,
    region_crop,
    split_defects,
    strongest_region,
    type_epochs,
    type_table,
    with_types,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--backbone", "test_efficientnet", "--weights", "random", "--image-size", "32",
        "--folds", "2", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--quiet"]


# ----------------------------------------------------------------------------- the split
def _samples(n_per_type: dict[str, int]) -> list[Sample]:
    out = [Sample(Path(f"/d/part/good/{i:03d}.png"), 0, "good", "part") for i in range(5)]
    for t, n in n_per_type.items():
        out += [Sample(Path(f"/d/part/{t}/{i:03d}.png"), 1, t, "part") for i in range(n)]
    return out


def test_split_is_per_type_deterministic_and_order_free() -> None:
    samples = _samples({"crack": 9, "hole": 2, "stain": 1, "bent": 20})
    train, evaluate = split_defects(samples, 0.5)
    assert not {s.path for s in train} & {s.path for s in evaluate}
    assert {s.path for s in train} | {s.path for s in evaluate} == \
        {s.path for s in samples if s.is_defect}  # good parts are in neither
    count = {t: sum(s.defect_type == t for s in train) for t in ("crack", "hole", "stain", "bent")}
    assert count == {"crack": 4, "hole": 1, "stain": 1, "bent": 10}  # round(), >= 1 left
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    train2, _ = split_defects(shuffled, 0.5)
    assert {s.path for s in train2} == {s.path for s in train}
    more, _ = split_defects(samples, 0.8)
    assert sum(s.defect_type == "bent" for s in more) == 16
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="--type-train-fraction"):
            split_defects(samples, bad)


def test_type_epochs_give_small_sets_enough_optimizer_steps() -> None:
    assert type_epochs(210, 16, 8) == 19  # 14 steps an epoch: 19 epochs for 256 steps
    assert type_epochs(849, 16, 8) == 8  # 54 steps an epoch: 8 epochs are 432 steps already
    assert type_epochs(5, 16, 8, min_steps=10) == 10  # one (short) step an epoch
    assert type_epochs(100, 10, 30, min_steps=100) == 30  # never fewer than asked


# ----------------------------------------------------------------------------- crops
def test_region_crop_is_a_square_around_the_box_inside_the_image() -> None:
    box = region_crop((100, 50, 120, 60), (200, 300), margin=0.25, min_side=0.1)
    x0, y0, x1, y1 = box
    assert x1 - x0 == y1 - y0 == 30  # 20 px side x 1.5
    assert x0 <= 100 and y0 <= 50 and x1 >= 120 and y1 >= 60
    assert region_crop((10, 10, 12, 12), (200, 300), 0.25, 0.25) == (0, 0, 50, 50)  # min side
    assert region_crop((290, 190, 300, 200), (200, 300), 0.0, 0.25) == (250, 150, 300, 200)
    big = region_crop((0, 0, 300, 200), (200, 300), 0.5, 0.25)  # larger than the image: cut
    assert big == (0, 0, 300, 200)


def test_mask_box_and_crop_pixels(tmp_path) -> None:
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:35] = 255
    path = write_png(tmp_path / "m.png", mask)
    assert mask_box(path) == (30, 10, 35, 20)
    assert mask_box(path, (80, 120)) == (60, 20, 70, 40)  # the image is twice the mask's size
    assert mask_box(write_png(tmp_path / "e.png", np.zeros((4, 4), np.uint8))) is None
    image = np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8)
    np.testing.assert_array_equal(crop_pixels(image, (30, 10, 35, 20), (10, 5)),
                                  image[10:20, 30:35])
    assert crop_pixels(image, None, (20, 30)).shape == (20, 30, 3)


def test_region_tables_crop_around_the_masks_and_cache_the_crops(synthetic_root, tmp_path):
    samples = open_dataset(synthetic_root / "washer").samples
    train, evaluate = split_defects(samples, 0.5)
    table = type_table(train, "region")
    assert table.boxes is not None and all(b is not None for b in table.boxes)
    assert {it.state for it in table.items} == {s.defect_type for s in train}
    for it, s in zip(table.items, train):
        inner = mask_box(s.mask_path)
        x0, y0, x1, y1 = it.box
        assert x0 <= inner[0] and y0 <= inner[1] and x1 >= inner[2] and y1 >= inner[3]
    whole = type_table(train, "image")
    assert whole.boxes is None
    pix = cached_pixels(table.paths, 16, tmp_path / "cache", progress=False, boxes=table.boxes)
    first = np.asarray(Image.open(table.paths[0]).convert("RGB"))
    np.testing.assert_array_equal(pix[0].transpose(1, 2, 0),
                                  crop_pixels(first, table.boxes[0], (16, 16)))
    assert cache_key(table.paths, (16, 16), table.boxes) != cache_key(table.paths, (16, 16))
    no_mask = [replace(s, mask_path=None) for s in train[:1]]
    with pytest.raises(DatasetError, match="no ground-truth mask.*--input image"):
        type_table(no_mask, "region")
    tables = defect_type_table([synthetic_root / "washer"], "type-eval")
    assert sorted(tables.paths) == sorted(s.path for s in evaluate)
    with pytest.raises(DatasetError, match="no defect images"):
        defect_type_table([_good_only(tmp_path)])


def _good_only(tmp_path: Path) -> Path:
    for i in range(4):
        write_png(tmp_path / "good-only" / "good" / f"{i}.png", np.full((8, 8), 9 * i, np.uint8))
    return tmp_path / "good-only"


# ----------------------------------------------------------------------------- naming
class FakeClassifier:
    """Records the pixels it is given; answers label 1 for bright crops, 0 for dark ones."""

    def __init__(self, two_stage: dict | None = None) -> None:
        self.config = {"labels": ["part-dark", "part-light"], "label_classes": {},
                       **({"two_stage": two_stage} if two_stage else {})}
        self.image_size = (8, 8)
        self.labels = self.config["labels"]
        self.seen: list[np.ndarray] = []

    def proba_from_uint8(self, batch: np.ndarray, tta: str | None = None) -> np.ndarray:
        self.seen.append(batch.copy())
        light = batch.reshape(len(batch), -1).mean(1) / 255.0
        return np.stack([1 - light, light], 1).astype(np.float32)


def _pred(verdict: str, regions=(), size=(100, 200), path=None) -> Prediction:
    return Prediction(path, 1.0, 0.9, 0.5, verdict, regions=list(regions), image_size=size)


def test_name_defects_names_rejected_parts_only_on_the_strongest_region() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 150:170] = 255  # a bright defect at the right
    weak = Region([10, 10, 20, 20], 100, 0.6)
    strong = Region([150, 40, 170, 60], 400, 0.9)
    preds = [_pred("ok"), _pred("defect", [weak, strong]), _pred("defect")]
    clf = FakeClassifier({"input": "region", "margin": 0.0, "min_side": 0.0})
    out = name_defects(clf, preds, [image] * 3)
    assert out[0] is None
    assert out[1]["label"] == "part-light" and out[1]["input"] == "region"
    assert out[1]["box"] == [150, 40, 170, 60] and out[1]["probability"] == pytest.approx(1.0)
    assert out[2]["input"] == "image" and out[2]["box"] is None  # no region: the whole image
    assert out[2]["label"] == "part-dark"
    assert sum(len(b) for b in clf.seen) == 2  # the OK part was not classified
    # the whole image when asked (or by a model without two_stage settings)
    whole = name_defects(FakeClassifier(), preds, [image] * 3)
    assert whole[1]["input"] == "image" and whole[1]["label"] == "part-dark"
    # a smaller decoded view: the box is scaled from the original size
    small = image[::2, ::2]
    scaled = name_defects(clf, preds, [small] * 3)
    assert scaled[1]["label"] == "part-light" and scaled[1]["box"] == [150, 40, 170, 60]
    assert strongest_region(_pred("defect", [weak, strong])) is strong
    with pytest.raises(ConfigError, match="2 images for 3 predictions"):
        name_defects(clf, preds, [image] * 2)
    with pytest.raises(ConfigError, match="--input crop"):
        name_defects(clf, preds, [image] * 3, input="crop")


def test_name_defects_averages_several_models_each_on_its_own_input() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 150:170] = 255
    preds = [_pred("defect", [Region([150, 40, 170, 60], 400, 0.9)])]
    region = FakeClassifier({"input": "region", "margin": 0.0, "min_side": 0.0})
    whole = FakeClassifier()
    (rec,) = name_defects([whole, region], preds, [image], probabilities=True)
    light = crop_pixels(image, None, (8, 8)).mean() / 255  # the whole image, at 8 x 8 px
    assert 0.01 < light < 0.03  # about the bright share (400 of 20000 pixels)
    np.testing.assert_allclose(rec["probabilities"], [(1 - light + 0) / 2, (light + 1) / 2],
                               rtol=1e-5)
    assert rec["input"] == "image+region" and rec["box"] == [150, 40, 170, 60]
    assert rec["label"] == "part-light"
    other = FakeClassifier()
    other.labels = other.config["labels"] = ["part-a", "part-b"]
    with pytest.raises(ConfigError, match="different labels"):
        name_defects([whole, other], preds, [image])


def test_with_types_adds_the_record_to_every_output_form() -> None:
    rec = {"label": "part-light", "class": "part", "state": "light", "probability": 0.75,
           "input": "image", "box": None}
    assert with_types([{"a": 1}, {"a": 2}], None) == [{"a": 1}, {"a": 2}]
    assert with_types([{"a": 1}, {"a": 2}], [None, rec]) == \
        [{"a": 1, "defect_type": None}, {"a": 2, "defect_type": rec}]
    assert with_types([{"a": 1}], [rec], "csv") == \
        [{"a": 1, "defect_type": "part-light", "defect_type_probability": "0.750000"}]
    assert with_types([["x"]], [rec], "table") == [["x", "part-light (0.75)"]]


def test_default_recipe_tta_never_flips_metal_nut() -> None:
    """The budget recipe's flip TTA averages flipped views, except for images whose plain
    prediction is a metal_nut label (a flipped good nut looks like metal_nut-flip)."""
    augment = ClassifierConfig.from_recipe("cpu").augment.to_dict()
    assert augment["no_flip_classes"] == ["metal_nut"]
    labels = ["bottle-broken", "metal_nut-flip", "metal_nut-good"]
    config = {"labels": labels, "label_classes": {}, "augment": augment, "tta": "flips"}
    views: list[int] = []

    def proba(x: np.ndarray) -> np.ndarray:
        views.append(len(x))
        upright = x[:, 0, 0, 0] == 255  # the marker pixel is top-left only when unflipped
        nut = x[:, 1].max(axis=(1, 2)) == 7
        out = np.zeros((len(x), 3), np.float32)
        out[nut & upright] = [0, 0.2, 0.8]
        out[nut & ~upright] = [0, 0.8, 0.2]
        out[~nut] = [1, 0, 0]
        return out

    x = np.zeros((2, 3, 4, 4), np.uint8)
    x[:, 0, 0, 0] = 255
    x[1, 1, 1, 2] = 7  # the second image is a nut
    p = tta_proba(proba, x, None, config)  # the model's own TTA: flips
    assert len(views) == 4  # the views were computed ...
    np.testing.assert_allclose(p[1], [0, 0.2, 0.8])  # ... but the nut keeps its plain answer
    np.testing.assert_allclose(p[0], [1, 0, 0])


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def type_models(synthetic_root, tmp_path_factory) -> dict[str, Path]:
    """Tiny type classifiers of both inputs from the synthetic washer's defects."""
    tmp = tmp_path_factory.mktemp("types")
    out = {}
    for input in ("image", "region"):
        path = tmp / f"{input}.safetensors"
        args = ["classify", "fit", str(synthetic_root / "washer"), "--defects-only", "--input",
                input, "-o", str(path), *TINY, "--cache-dir", str(tmp / "cache")]
        with pytest.warns(UserWarning, match="RANDOM"):
            assert main(args) == 0
        out[input] = path
    return out


@pytest.fixture(scope="module")
def detector(synthetic_root, tmp_path_factory) -> Path:
    """A tiny detector whose threshold is the median test score: some parts rejected, some
    passed (its quality is not what these tests are about)."""
    washer = open_dataset(synthetic_root / "washer")
    inspector = Inspector.train(washer, "ncae", image_size=32, widths=[8, 16],
                                latent_channels=8, batch_size=8, epochs=1, progress=False,
                                device="cpu")
    scores = [p.score for p in inspector.predict([s.path for s in washer.test])]
    inspector.threshold = Threshold(float(np.median(scores)), "manual")
    return inspector.save(tmp_path_factory.mktemp("det") / "washer.safetensors")


def test_fit_defects_only_learns_types_from_the_type_train_part(type_models, synthetic_root):
    samples = open_dataset(synthetic_root / "washer").samples
    train, _ = split_defects(samples, TYPE_TRAIN_FRACTION)
    for input, path in type_models.items():
        config, _ = load_model(path, kind="classifier")
        assert config["two_stage"]["input"] == input
        assert config["two_stage"]["type_train_fraction"] == TYPE_TRAIN_FRACTION == 0.7
        assert "washer-good" not in config["labels"]
        assert config["labels"] == sorted({s.state_label for s in train})
        assert config["data"]["n_images"] == len(train)


@pytest.mark.parametrize("extra, match", [
    (["--defects-only", "--csv", "x.csv"], "--defects-only reads dataset folders"),
    (["--input", "region"], "--input applies to --defects-only"),
    (["--defects-only", "--type-train-fraction", "1"], "--type-train-fraction 1.0: must be"),
])
def test_fit_defects_only_option_errors(extra, match, synthetic_root, tmp_path, capsys):
    args = ["classify", "fit", str(synthetic_root / "washer"), "-o", str(tmp_path / "m"), *TINY]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_predict_with_classifier_names_rejected_parts(detector, type_models, synthetic_root,
                                                      tmp_path, capsys) -> None:
    images = sorted((synthetic_root / "washer" / "test").rglob("*.png"))
    csv_path = tmp_path / "out.csv"
    assert main(["predict", str(detector), *map(str, images), "--json", "--device", "cpu",
                 "--classifier", str(type_models["region"]), "--csv", str(csv_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    config, _ = load_model(type_models["region"], kind="classifier")
    assert len(rows) == len(images)
    assert any(r["verdict"] == "defect" for r in rows)
    for r in rows:
        t = r["defect_type"]
        if r["verdict"] != "defect":
            assert t is None
            continue
        assert t["label"] in config["labels"] and 0 < t["probability"] <= 1
        assert t["input"] == ("region" if r["regions"] else "image")
    with open(csv_path) as fh:
        table = list(csv.DictReader(fh))
    assert [row["defect_type"] for row in table] == \
        [r["defect_type"]["label"] if r["defect_type"] else "" for r in rows]
    # both models averaged: the mean of their probabilities, on the image and the region
    assert main(["predict", str(detector), *map(str, images), "--json", "--device", "cpu",
                 "--classifier", str(type_models["image"]), "--classifier",
                 str(type_models["region"])]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [r["verdict"] for r in both] == [r["verdict"] for r in rows]
    for r in both:
        if r["defect_type"] is not None:
            assert r["defect_type"]["input"] == ("image+region" if r["regions"] else "image")
    # a detector file given as the classifier: one clean line, exit 2
    assert main(["predict", str(detector), str(images[0]), "--classifier", str(detector)]) == 2
    err = capsys.readouterr().err
    assert "--classifier" in err and "Traceback" not in err


def test_two_stage_cli_reports_type_accuracy_and_confusion(detector, type_models,
                                                           synthetic_root, tmp_path, capsys):
    report = tmp_path / "report"
    per_image = tmp_path / "per-image.csv"
    assert main(["classify", "two-stage", str(detector), str(synthetic_root / "washer"),
                 "--classifier", str(type_models["image"]), "--json", "--report", str(report),
                 "--per-image", str(per_image), "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    _, evaluate = split_defects(open_dataset(synthetic_root / "washer").samples,
                                TYPE_TRAIN_FRACTION)
    assert m["defects"] == len(evaluate)  # the type-eval part only
    conf = m["confusion"]
    assert sum(map(sum, conf["counts"])) == m["rejected_defects"]
    diag = sum(row[conf["named"].index(t)] for t, row in zip(conf["true"], conf["counts"]))
    assert diag == m["named_right"]
    if m["rejected_defects"]:
        assert m["type_accuracy"] == pytest.approx(m["named_right"] / m["rejected_defects"])
    html = (report / "report.html").read_text()
    assert "<table>" in html and all(t in html for t in conf["true"])
    assert json.loads((report / "types.json").read_text())["defects"] == m["defects"]
    with open(per_image) as fh:
        rows = list(csv.DictReader(fh))
    assert {r["true"] for r in rows} >= {"good"} and len(rows) == m["defects"] + m["good"]
    assert all((r["named"] == "") == (r["verdict"] != "defect") for r in rows)


@pytest.mark.data
def test_mvtec_defect_split_and_region_boxes_on_real_data() -> None:
    """metal_nut (23-25 images per defect type, masks in ground_truth/): half of each type
    trains, every region crop holds its whole mask and lies inside the 320 x 320 image."""
    root = shared_data("mvtec_ad") / "metal_nut"
    samples = open_dataset(root).samples
    train, evaluate = split_defects(samples, 0.5)
    n = {t: sum(s.defect_type == t for s in samples) for t in ("bent", "color", "flip", "scratch")}
    got = {t: sum(s.defect_type == t for s in train) for t in n}
    assert got == {t: round(v / 2) for t, v in n.items()}
    assert len(train) + len(evaluate) == sum(n.values())
    table = type_table(train, "region")
    for it, s in zip(table.items, train):
        inner = mask_box(s.mask_path)
        x0, y0, x1, y1 = it.box
        assert 0 <= x0 <= inner[0] and 0 <= y0 <= inner[1]
        assert inner[2] <= x1 <= 320 and inner[3] <= y1 <= 320
        assert x1 - x0 >= 80 and y1 - y0 >= 80  # at least a quarter of the image side


@needs_ort
def test_onnx_export_keeps_the_two_stage_settings(type_models, tmp_path, capsys) -> None:
    from flawscope.twostage import load_type_classifier

    onnx = tmp_path / "region.onnx"
    assert main(["classify", "export", str(type_models["region"]), "-o", str(onnx)]) == 0
    torch_model = load_type_classifier(type_models["region"], "cpu")
    onnx_model = load_type_classifier(onnx)
    assert onnx_model.config["two_stage"] == torch_model.config["two_stage"]
    assert onnx_model.config["two_stage"]["input"] == "region"
    image = np.zeros((64, 64, 3), np.uint8)
    image[10:20, 30:40] = 200
    preds = [_pred("defect", [Region([30, 10, 40, 20], 100, 0.9)], size=(64, 64))]
    a, b = name_defects(torch_model, preds, [image]), name_defects(onnx_model, preds, [image])
    assert a[0]["box"] == b[0]["box"] and a[0]["input"] == b[0]["input"] == "region"
    assert a[0]["label"] == b[0]["label"]
    assert a[0]["probability"] == pytest.approx(b[0]["probability"], abs=1e-4)
