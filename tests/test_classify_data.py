"""flawscope.classify.data: label tables from CSV / datasets, subsets, the pixel cache."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_png
from flawscope.classify import data as D
from flawscope.errors import ConfigError, DatasetError


def _images(folder, names, size=16, seed=0):
    rng = np.random.default_rng(seed)
    for n in names:
        write_png(folder / n, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_csv_dacon_form_and_derived_label(tmp_path) -> None:
    _images(tmp_path / "train", ["10000.png", "10001.png", "10002.png"])
    (tmp_path / "train.csv").write_text(
        "index,file_name,class,state\n"
        "0,10000.png,cable,bent_wire\n1,10001.png,metal_nut,good\n2,10002.png,cable,good\n"
    )
    t = D.read_label_csv(tmp_path / "train.csv")  # images found in the folder named like the CSV
    assert [it.label for it in t.items] == ["cable-bent_wire", "metal_nut-good", "cable-good"]
    assert t.items[1].object_class == "metal_nut" and t.items[1].state == "good"
    assert t.items[2].index == "2" and t.items[2].file_name == "10002.png"
    assert t.labels == ["cable-bent_wire", "cable-good", "metal_nut-good"]
    np.testing.assert_array_equal(t.targets(t.labels), [0, 2, 1])
    # label only: class and state are split from it
    (tmp_path / "l.csv").write_text("file_name,label\n10000.png,metal_nut-flip\n")
    it = D.read_label_csv(tmp_path / "l.csv", tmp_path / "train").items[0]
    assert (it.object_class, it.state, it.label) == ("metal_nut", "flip", "metal_nut-flip")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("file_name,class\na.png,cable\n", r"bad\.csv: missing column\(s\) state"),
        ("name,label\na.png,x-y\n", r"missing column\(s\) file_name"),
        ("file_name,class,state\n", "no data rows"),
        ("", "empty file"),
        ("file_name,class,state\na.png,,good\n", r"bad\.csv line 2: empty class"),
        ("file_name,class,state\na.png,cable,good\nmissing.png,cable,good\n",
         r"1 image file\(s\) not found .*line 3: missing\.png"),
    ],
)
def test_csv_errors_name_file_line_and_field(tmp_path, text, match) -> None:
    _images(tmp_path, ["a.png"])
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        D.read_label_csv(tmp_path / "bad.csv", tmp_path)


def test_unknown_label_is_named(tmp_path) -> None:
    _images(tmp_path, ["a.png"])
    (tmp_path / "t.csv").write_text("file_name,label\na.png,screw-thread\n")
    t = D.read_label_csv(tmp_path / "t.csv", tmp_path)
    with pytest.raises(DatasetError, match="screw-thread"):
        t.targets(["cable-good", "cable-cut"])


def test_datasets_become_class_state_labels(synthetic_root) -> None:
    tile = D.table_from_datasets([synthetic_root / "tile"])
    assert set(tile.labels) == {"tile-good", "tile-scratch", "tile-hole", "tile-stain",
                                "tile-crack"}
    both = D.combine_tables([tile, D.table_from_datasets([synthetic_root])])
    assert len(both) == 88  # the tile images listed twice are kept once
    assert {lab.split("-")[0] for lab in both.labels} == {"tile", "washer"}
    assert both.counts()["washer-good"] == 32
    with pytest.raises(ConfigError, match="at most one image folder"):
        D.load_table([synthetic_root, synthetic_root], csv_file="x.csv")
    with pytest.raises(DatasetError, match="no such folder"):
        D.load_table([synthetic_root / "nope"])


def test_stratified_sample_is_deterministic(synthetic_root) -> None:
    t = D.table_from_datasets([synthetic_root])
    a = D.stratified_sample(t, max_per_label=5)
    assert a.counts() == {lab: min(5, n) for lab, n in t.counts().items()}
    b = D.stratified_sample(t, limit=40)
    assert b.paths == D.stratified_sample(t, limit=40).paths
    assert len(b) == 40 and set(b.labels) == set(t.labels)
    assert all(n >= 2 for n in b.counts().values())


def test_cache_decodes_once_and_is_memory_mapped(tmp_path, synthetic_root, monkeypatch) -> None:
    paths = D.table_from_datasets([synthetic_root / "washer"]).paths[:10]
    first = D.cached_pixels(paths, 24, tmp_path / "cache", progress=False)
    assert first.shape == (10, 3, 24, 24) and first.dtype == np.uint8
    assert isinstance(first, np.memmap)
    from flawscope.data.images import load_images

    np.testing.assert_array_equal(np.asarray(first), load_images(paths, 24, 3).pixels)

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(D, "load_images", no_decoding)
    again = D.cached_pixels(paths, 24, tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    with pytest.raises(AssertionError, match="decoded again"):  # another size: a new cache
        D.cached_pixels(paths, 16, tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # no temporary file left over


def test_channel_stats_exact() -> None:
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, (7, 3, 5, 6), dtype=np.uint8)
    px[:, 2] = 9  # constant channel
    mean, std = D.channel_stats(px, chunk=3)
    f = px.astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std[:2], f.std(axis=(0, 2, 3))[:2], rtol=1e-9)
    assert std[2] == 1.0
    m2, _ = D.channel_stats(px, [1, 4])
    np.testing.assert_allclose(m2, f[[1, 4]].mean(axis=(0, 2, 3)), rtol=1e-12)
