"""The embedded synthetic dataset: layout, image kinds, masks, determinism, folder safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from flawscope.data import synthetic
from flawscope.data.synthetic import (
    CATEGORIES,
    DEFECT_TYPES,
    MANIFEST,
    generate_dataset,
    render_sample,
)
from flawscope.errors import ConfigError, DatasetError

SMALL = dict(n_train=8, n_test_good=3, n_test_per_defect=4, image_size=96, seed=3)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float32)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("syn") / "data", **SMALL)


def test_layout_and_counts(dataset: Path) -> None:
    def names(folder: str) -> list[str]:
        return sorted(p.name for p in (dataset / folder).iterdir())

    assert names(".") == sorted([*CATEGORIES, MANIFEST])
    for cat in CATEGORIES:
        assert names(f"{cat}/train/good") == [f"{i:03d}.png" for i in range(SMALL["n_train"])]
        assert names(f"{cat}/test/good") == [f"{i:03d}.png" for i in range(SMALL["n_test_good"])]
        assert names(f"{cat}/test") == sorted(["good", *DEFECT_TYPES[cat]])
        assert names(f"{cat}/ground_truth") == sorted(DEFECT_TYPES[cat])
        for defect in DEFECT_TYPES[cat]:
            idx = range(SMALL["n_test_per_defect"])
            assert names(f"{cat}/test/{defect}") == [f"{i:03d}.png" for i in idx]
            assert names(f"{cat}/ground_truth/{defect}") == [f"{i:03d}_mask.png" for i in idx]
    kinds = {t for types in DEFECT_TYPES.values() for t in types}
    assert {"scratch", "hole", "stain", "crack", "missing"} <= kinds


def test_reads_as_mvtec(dataset: Path) -> None:
    from flawscope.data import open_dataset

    ds = open_dataset(dataset)
    assert ds.format == "mvtec"
    n_def = sum(len(DEFECT_TYPES[c]) for c in CATEGORIES) * SMALL["n_test_per_defect"]
    assert len(ds.train) == len(CATEGORIES) * SMALL["n_train"]
    assert sum(s.is_defect for s in ds.test) == n_def
    assert all(s.mask_path is not None for s in ds.test if s.is_defect)


@pytest.mark.parametrize("cat, mode", [("tile", "L"), ("washer", "RGB")])
def test_images_are_png_of_size_and_mode(dataset: Path, cat: str, mode: str) -> None:
    for path in sorted((dataset / cat).glob("*/*/*.png")):
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.size == (SMALL["image_size"],) * 2
            assert im.mode == ("L" if "ground_truth" in path.parts else mode), path


def test_good_images_vary(dataset: Path) -> None:
    for cat in CATEGORIES:
        train = [_load(p) for p in sorted((dataset / cat / "train" / "good").glob("*.png"))]
        test = [_load(p) for p in sorted((dataset / cat / "test" / "good").glob("*.png"))]
        assert all(np.abs(a - b).mean() > 1 for a, b in zip(train, train[1:], strict=False))
        # test/good is drawn like train/good: brightness within the spread of train/good
        means = [im.mean() for im in train]
        lo, hi = min(means) - 2 * np.std(means), max(means) + 2 * np.std(means)
        assert all(lo <= im.mean() <= hi for im in test)


@pytest.mark.parametrize("cat", CATEGORIES)
def test_masks_are_binary_small_and_on_the_defect(dataset: Path, cat: str) -> None:
    typical = np.median([_load(p) for p in (dataset / cat / "train" / "good").glob("*.png")], 0)
    for defect in DEFECT_TYPES[cat]:
        for img_path in sorted((dataset / cat / "test" / defect).glob("*.png")):
            mask_path = dataset / cat / "ground_truth" / defect / f"{img_path.stem}_mask.png"
            mask = np.asarray(Image.open(mask_path))
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}, mask_path
            m = mask == 255
            assert 0.002 <= m.mean() <= 0.06, (mask_path, m.mean())
            diff = np.abs(_load(img_path) - typical)
            diff = diff.mean(-1) if diff.ndim == 3 else diff
            # the defect stands out from a typical good part inside the mask, not outside
            assert diff[m].mean() > 1.5 * diff[~m].mean() + 5, (img_path, diff[m].mean())


@pytest.mark.parametrize("cat", CATEGORIES)
def test_only_masked_pixels_change(cat: str) -> None:
    for defect in DEFECT_TYPES[cat]:
        for index in range(6):
            s = render_sample(cat, defect, index=index, image_size=128)
            diff = np.abs(s.image.astype(int) - s.clean.astype(int))
            diff = diff.max(-1) if diff.ndim == 3 else diff
            assert s.mask.shape == diff.shape and s.mask.any()
            assert diff[s.mask].mean() > 35, (defect, index)
            assert (diff[s.mask] > 8).mean() > 0.85, (defect, index)
            changed = diff > 25
            outside = changed & ~binary_dilation(s.mask, iterations=2)
            assert outside.sum() <= 0.02 * changed.sum(), (defect, index)
    good = render_sample(cat, "good", index=1)
    assert not good.mask.any() and np.array_equal(good.image, good.clean)


def test_deterministic_and_seeded(tmp_path: Path, dataset: Path) -> None:
    again = generate_dataset(tmp_path / "again", **SMALL)
    assert again == tmp_path / "again"
    assert _files(again) == _files(dataset)
    other = generate_dataset(tmp_path / "other", ["tile"], **{**SMALL, "seed": 4})
    a, b = (_load(d / "tile/train/good/000.png") for d in (dataset, other))
    assert np.abs(a - b).mean() > 1


def test_reuses_complete_dataset(tmp_path: Path) -> None:
    params = dict(n_train=2, n_test_good=1, n_test_per_defect=1, image_size=64)
    out = generate_dataset(tmp_path / "d", ["washer"], **params)
    probe = out / "washer/train/good/000.png"
    stamp = probe.stat().st_mtime_ns, probe.stat().st_ino
    assert generate_dataset(out, ["washer"], **params) == out
    assert (probe.stat().st_mtime_ns, probe.stat().st_ino) == stamp
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["version"] == synthetic.GENERATOR_VERSION and manifest["image_size"] == 64

    before = _files(out)
    generate_dataset(out, ["washer"], **params, overwrite=True)  # regenerated, same bytes
    assert probe.stat().st_ino != stamp[1] and _files(out) == before

    (out / "washer/test/hole/000.png").unlink()  # damaged: rebuilt
    generate_dataset(out, ["washer"], **params)
    assert _files(out) == before

    with pytest.raises(DatasetError, match="other parameters"):
        generate_dataset(out, ["washer"], **{**params, "seed": 1})
    generate_dataset(out, ["washer"], **{**params, "seed": 1}, overwrite=True)
    assert json.loads((out / MANIFEST).read_text())["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folders left


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DatasetError, match="mine"):
            generate_dataset(foreign, ["tile"], n_train=1, overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(DatasetError, match="not a folder"):
        generate_dataset(foreign / "notes.txt", ["tile"], n_train=1)

    empty = tmp_path / "empty"
    empty.mkdir()
    generate_dataset(empty, ["tile"], n_train=1, n_test_good=1, n_test_per_defect=1)
    assert (empty / MANIFEST).is_file()


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls, save = [], synthetic._save_png

    def failing_save(array: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) > 5:
            raise KeyboardInterrupt("test interrupt")
        save(array, path)

    monkeypatch.setattr(synthetic, "_save_png", failing_save)
    with pytest.raises(KeyboardInterrupt, match="test interrupt"):
        generate_dataset(tmp_path / "d", ["tile"], n_train=10)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bolt"):
        generate_dataset(tmp_path / "d", ["bolt"])
    with pytest.raises(ConfigError, match="image size 16: must be at least 32"):
        generate_dataset(tmp_path / "d", image_size=16)
    with pytest.raises(ConfigError, match="missing"):
        render_sample("tile", "missing")
    assert not (tmp_path / "d").exists()
