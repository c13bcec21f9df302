"""Dataset layouts, auto-detection, sample records and deterministic splits."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_data, write_png
from flawscope.data.dataset import (
    detect_format,
    hash_fraction,
    open_dataset,
    open_folders,
    split_good,
)
from flawscope.errors import DatasetError

IMG = np.full((12, 12), 100, np.uint8)


def test_mvtec_layout(synthetic_root):
    ds = open_dataset(synthetic_root / "washer")
    assert ds.format == "mvtec"
    assert len(ds.train) == 24 and all(s.label == 0 for s in ds.train)
    defects = [s for s in ds.test if s.is_defect]
    assert defects and all(s.mask_path is not None and s.mask_path.exists() for s in defects)
    assert {s.object_class for s in ds.samples} == {"washer"}
    assert ds.has_masks
    # the parent folder holds two categories
    both = open_dataset(synthetic_root)
    assert {s.object_class for s in both.samples} == {"tile", "washer"}


def test_folder_layout_with_masks(tmp_path):
    for i in range(20):
        write_png(tmp_path / "good" / f"g{i}.png", IMG)
    write_png(tmp_path / "scratch" / "s1.png", IMG)
    write_png(tmp_path / "masks" / "scratch" / "s1.png", IMG)
    write_png(tmp_path / "dent" / "d1.png", IMG)
    ds = open_dataset(tmp_path)
    assert ds.format == "folder"
    defects = {s.path.name: s for s in ds.test if s.is_defect}
    assert set(defects) == {"s1.png", "d1.png"}
    assert defects["s1.png"].mask_path == tmp_path / "masks" / "scratch" / "s1.png"
    assert defects["d1.png"].mask_path is None and defects["d1.png"].defect_type == "dent"
    goods = [s for s in ds.samples if not s.is_defect]
    assert {s.split for s in goods} == {"train", "test"}  # 70/30 hash split


def test_plain_folder_of_good_images(tmp_path):
    for i in range(10):
        write_png(tmp_path / f"{i}.png", IMG)
    ds = open_dataset(tmp_path)
    assert ds.format == "folder" and len(ds.samples) == 10 and not any(s.label for s in ds.samples)


def test_casting_layout(tmp_path):
    for split in ("train", "test"):
        write_png(tmp_path / split / "ok_front" / "cast_ok_0_1.jpeg", IMG)
        write_png(tmp_path / split / "def_front" / "cast_def_0_1.jpeg", IMG)
    ds = open_dataset(tmp_path)
    assert ds.format == "casting"
    assert len(ds.train) == 1 and len(ds.train_defects) == 1 and len(ds.test) == 2


def test_magnetic_tile_layout(tmp_path):
    for i in range(30):
        write_png(tmp_path / "MT_Free" / "Imgs" / f"f{i}.jpg", IMG)
        write_png(tmp_path / "MT_Free" / "Imgs" / f"f{i}.png", IMG * 0)
    write_png(tmp_path / "MT_Crack" / "Imgs" / "c1.jpg", IMG)
    write_png(tmp_path / "MT_Crack" / "Imgs" / "c1.png", IMG)
    ds = open_dataset(tmp_path)
    assert ds.format == "magnetic-tile"
    crack = [s for s in ds.samples if s.is_defect]
    assert len(crack) == 1 and crack[0].defect_type == "Crack"
    assert crack[0].mask_path.name == "c1.png"
    free_test = [s for s in ds.test if not s.is_defect]
    expected = sum(hash_fraction(f"f{i}.jpg") < 0.3 for i in range(30))
    assert len(free_test) == expected and 0 < expected < 30
    assert len(ds.train) == 30 - expected


@pytest.mark.data
def test_real_magnetic_tile_split_is_documented():
    root = shared_data("magnetic_tile")
    ds = open_dataset(root)
    free = [s for s in ds.samples if s.defect_type == "good"]
    assert len(free) == 952
    assert 0.25 < sum(s.split == "test" for s in free) / 952 < 0.35


def test_format_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="unknown dataset layout") as info:
        open_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    (tmp_path / "nogood" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(tmp_path / "nogood")
    with pytest.raises(DatasetError, match="unknown"):
        open_dataset(tmp_path, format="coco")
    f = write_png(tmp_path / "x.png", IMG)
    with pytest.raises(DatasetError, match="not a folder"):
        open_dataset(f)


def test_forced_format(synthetic_root):
    assert detect_format(synthetic_root / "tile") == "mvtec"
    ds = open_dataset(synthetic_root / "tile" / "train" / "good", format="folder")
    assert ds.format == "folder" and len(ds.samples) == 24


def test_split_good_is_deterministic_and_disjoint(synthetic_root):
    train = open_dataset(synthetic_root / "tile").train
    fit, val, cal = split_good(train, 0.1, 0.2)
    names = [s.path for part in (fit, val, cal) for s in part]
    assert sorted(names) == sorted(s.path for s in train)  # a partition
    assert len(cal) == round(24 * 0.2) and len(val) == round(24 * 0.1)
    again = split_good(list(reversed(train)), 0.1, 0.2)
    assert {s.path for s in again[2]} == {s.path for s in cal}  # order-independent
    with pytest.raises(DatasetError, match="fractions must be >= 0 and sum to less than 1"):
        split_good(train, 0.6, 0.5)


@pytest.mark.parametrize("good, defect", [("ok", "ng"), ("OK", "NG"), ("Normal", "anomaly"),
                                          ("good", "Defective"), ("ok", "NOK"), ("ok", "bad")])
def test_factory_folder_names(tmp_path, good, defect):
    for i in range(10):
        write_png(tmp_path / good / f"g{i}.png", IMG)
    for i in range(5):
        write_png(tmp_path / defect / f"d{i}.png", IMG)
    for fmt in ("auto", "folder"):  # --format folder used to find "no images" here
        ds = open_dataset(tmp_path, fmt)
        assert ds.format == "folder" and len(ds.samples) == 15
        goods = [s for s in ds.samples if not s.is_defect]
        assert len(goods) == 10 and all(s.path.parent.name == good for s in goods)
        assert {s.defect_type for s in ds.samples if s.is_defect} == {defect}
        assert all(s.split == "test" for s in ds.samples if s.is_defect)


def test_mvtec_layout_with_ok_folders(tmp_path):
    for i in range(4):
        write_png(tmp_path / "train" / "OK" / f"g{i}.png", IMG)
    write_png(tmp_path / "test" / "ok" / "t.png", IMG)
    write_png(tmp_path / "test" / "crack" / "c.png", IMG)
    (tmp_path / "ground_truth").mkdir()
    ds = open_dataset(tmp_path)
    assert ds.format == "mvtec" and len(ds.train) == 4
    assert {(s.path.name, s.label, s.defect_type) for s in ds.test} == {
        ("t.png", 0, "good"), ("c.png", 1, "crack")}


def test_images_in_a_subfolder_without_good_folder_say_what_was_found(tmp_path):
    x = tmp_path / "x"
    for i in range(15):
        write_png(x / "batch1" / f"{i}.png", IMG)
    for fmt in ("auto", "folder"):
        with pytest.raises(DatasetError) as info:
            open_dataset(x, fmt)
        msg = str(info.value)
        assert str(x) in msg and "batch1/ (15 images)" in msg
        assert "good/, ok/, normal/" in msg and "\n" not in msg
    with pytest.raises(DatasetError, match=r"tried casting, magnetic-tile, mvtec, folder"):
        open_dataset(x)
    with pytest.raises(DatasetError, match=r"--good"):
        open_dataset(x, "folder")


def test_defect_folder_without_good_folder(tmp_path):
    for i in range(15):
        write_png(tmp_path / f"{i}.png", IMG)
    write_png(tmp_path / "ng" / "d.png", IMG)
    with pytest.raises(DatasetError, match=r"has defect images in ng/ \(1 image\) but no "
                       r"good-parts subfolder .*15 images directly inside: move the good ones"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match="defect images in ng/"):
        open_dataset(tmp_path, "folder")


def test_several_good_folders_are_refused(tmp_path):
    write_png(tmp_path / "good" / "a.png", IMG)
    write_png(tmp_path / "ok" / "b.png", IMG)
    with pytest.raises(DatasetError, match=r"several good-parts folders \(good/, ok/\)"):
        open_dataset(tmp_path)


def test_forced_layout_error_says_what_it_expects(tmp_path):
    write_png(tmp_path / "ok" / "a.png", IMG)
    with pytest.raises(DatasetError) as info:
        open_dataset(tmp_path, "mvtec")
    msg = str(info.value)
    assert "no images found for the mvtec layout" in msg and "train/good/" in msg
    assert "ok/ (1 image)" in msg and str(tmp_path) in msg


def test_open_folders_matches_the_folder_layout(tmp_path):
    for i in range(20):
        write_png(tmp_path / "ok" / f"g{i}.png", IMG)
    for i in range(3):
        write_png(tmp_path / "ng" / f"d{i}.png", IMG)
    by_root = open_dataset(tmp_path)
    given = open_folders([tmp_path / "ok"], [tmp_path / "ng"])
    assert given.format == "folder" and given.root == tmp_path
    key = sorted((s.path, s.label, s.split) for s in by_root.samples)
    assert sorted((s.path, s.label, s.split) for s in given.samples) == key
    assert [s.path for s in open_folders([tmp_path / "ok"]).train] == [
        s.path for s in by_root.train]
    with pytest.raises(DatasetError, match=r"--good .*missing: no such file or folder"):
        open_folders([tmp_path / "missing"])
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match=r"--good .*none: no image files"):
        open_folders([tmp_path / "none"])
