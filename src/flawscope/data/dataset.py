"""Dataset layouts, one sample record for all of them, and deterministic splits.

Layouts (auto-detected; force one with ``format=``):

``mvtec``
    ``<cat>/train/good/*``, ``<cat>/test/<type>/*``, masks in
    ``<cat>/ground_truth/<type>/<name>_mask.png``. DATA may be one category folder or a folder
    of categories.
``casting``
    ``train|test/ok_front|def_front/*`` (Kaggle casting data). Training uses
    ``train/ok_front``; ``train/def_front`` is kept as labelled training defects.
``magnetic-tile``
    ``MT_<type>/Imgs/<name>.jpg`` with mask ``<name>.png`` beside it. No official split:
    ``MT_Free`` images go 70 % to train and 30 % to test by a hash of the file name (see
    :func:`hash_fraction`); every defect image is test.
``folder``
    a good-parts folder (``good/``, ``ok/`` or ``normal/``, any case) plus one folder per
    defect type (``ng/``, ``bad/``, ``scratch/``, ...); optional masks in
    ``masks/<type>/<name>.*`` or ``ground_truth/<type>/<name>_mask.*``. Good images go 70 %
    train / 30 % test by the same hash rule; defect images are test. A folder with only images
    of good parts is also a ``folder`` dataset (all good, same split), and so are explicit
    good (and defect) folders given to :func:`open_folders`.

Folder-name conventions live in :mod:`flawscope.layouts` (importable without numpy). Errors
name the folder, the layouts tried and what was found in it.

Training good images are further split into fit / validation / calibration by
:func:`split_good` with the same hash rule, so splits never depend on file order.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flawscope.data.images import IMAGE_SUFFIXES, is_image_file
from flawscope.errors import DatasetError
from flawscope.layouts import DEFECT_NAMES, GOOD_NAMES, LAYOUT_EXPECTS, LAYOUTS

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image with what is known about it."""

    path: Path
    label: int  # 0 = good, 1 = defect
    defect_type: str = GOOD  # "good" for good parts
    object_class: str = ""
    mask_path: Path | None = None
    split: str = "test"  # "train" | "test"

    @property
    def is_defect(self) -> bool:
        return self.label == 1

    @property
    def state_label(self) -> str:
        """``class-state`` label as in the Dacon data (e.g. ``cable-bent_wire``)."""
        return f"{self.object_class}-{self.defect_type}" if self.object_class else self.defect_type


@dataclass
class Dataset:
    """Samples of one dataset folder, with its detected layout."""

    root: Path
    format: str
    samples: list[Sample]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def train(self) -> list[Sample]:
        """Good images for fitting (and calibration / validation)."""
        return [s for s in self.samples if s.split == "train" and not s.is_defect]

    @property
    def train_defects(self) -> list[Sample]:
        """Labelled defect images of the training split (e.g. casting ``train/def_front``)."""
        return [s for s in self.samples if s.split == "train" and s.is_defect]

    @property
    def test(self) -> list[Sample]:
        return [s for s in self.samples if s.split == "test"]

    @property
    def has_masks(self) -> bool:
        return any(s.mask_path is not None for s in self.test if s.is_defect)

    def without_unreadable(self, workers: int | None = None) -> Dataset:
        """A copy without images (or masks) that cannot be decoded; they are listed in
        ``skipped`` with the reason. Decodes every file once."""
        from concurrent.futures import ThreadPoolExecutor

        from flawscope.data.images import read_image
        from flawscope.errors import ImageReadError

        def problem(s: Sample) -> str | None:
            try:
                read_image(s.path)
                if s.mask_path is not None:
                    read_image(s.mask_path)
            except ImageReadError as exc:
                return str(exc)
            return None

        with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) + 1)) as pool:
            problems = list(pool.map(problem, self.samples))
        kept = [s for s, p in zip(self.samples, problems) if p is None]
        bad = [(s.path, p) for s, p in zip(self.samples, problems) if p is not None]
        return Dataset(self.root, self.format, kept, self.skipped + bad)

    def summary(self) -> dict:
        counts = Counter((s.split, s.defect_type) for s in self.samples)
        return {
            "root": str(self.root),
            "format": self.format,
            "classes": sorted({s.object_class for s in self.samples}),
            "counts": {f"{split}/{kind}": n for (split, kind), n in sorted(counts.items())},
        }


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string (first 8 bytes of its SHA-1).

    File names that are not valid UTF-8 (decoded by Python with ``surrogateescape``) hash as
    their original bytes; every other name hashes as its UTF-8 bytes, as before."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_good_name(name: str) -> bool:
    return name.lower() in GOOD_NAMES


def _good_dir(folder: Path) -> Path | None:
    """The good-parts subfolder of ``folder`` (``good``, ``ok`` or ``normal``, any case)."""
    if not folder.is_dir():
        return None
    dirs = [d for d in _subfolders(folder) if _is_good_name(d.name)]
    if len(dirs) > 1:
        names = ", ".join(f"{d.name}/" for d in dirs)
        raise DatasetError(f"{folder}: several good-parts folders ({names}); keep one")
    return dirs[0] if dirs else None


def _n_images(folder: Path) -> str:
    """``"15 images"``, or where a folder has none directly inside, how many lie deeper."""
    n = len(_images_in(folder))
    if n:
        return f"{n} image{'s' * (n != 1)}"
    deeper = sum(1 for f in folder.rglob("*") if f.is_file() and is_image_file(f))
    return f"no images, {deeper} in its subfolders" if deeper else "no images"


def describe_folder(folder: Path, limit: int = 6) -> str:
    """What a folder holds, for error messages: ``"15 images directly inside; subfolders:
    ok/ (10 images), ng/ (5 images)"``."""
    n_top = len(_images_in(folder))
    subs = _subfolders(folder)
    text = f"{n_top} image{'s' * (n_top != 1)} directly inside"
    if subs:
        listed = ", ".join(f"{d.name}/ ({_n_images(d)})" for d in subs[:limit])
        more = f", and {len(subs) - limit} more" if len(subs) > limit else ""
        text += f"; subfolders: {listed}{more}"
    else:
        text += "; no subfolders"
    return text


def _find_mask(candidates: Sequence[Path]) -> Path | None:
    for c in candidates:
        if c.is_file():
            return c
    return None


# ----------------------------------------------------------------------------- readers
def _mvtec_category(cat: Path) -> list[Sample]:
    name = cat.name
    train_good = _good_dir(cat / "train")
    samples = [
        Sample(p, 0, GOOD, name, None, "train")
        for p in (_images_in(train_good) if train_good else [])
    ]
    test_dir = cat / "test"
    type_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
    for type_dir in type_dirs:
        kind = GOOD if _is_good_name(type_dir.name) else type_dir.name
        for p in _images_in(type_dir):
            mask = None
            if kind != GOOD:
                gt = cat / "ground_truth" / kind
                mask = _find_mask([gt / f"{p.stem}_mask.png", gt / f"{p.stem}.png"])
            samples.append(Sample(p, int(kind != GOOD), kind, name, mask, "test"))
    return samples


def _is_mvtec_category(path: Path) -> bool:
    return _good_dir(path / "train") is not None or (
        (path / "test").is_dir() and (path / "ground_truth").is_dir()
    )


def read_mvtec(root: Path) -> list[Sample]:
    if _is_mvtec_category(root):
        return _mvtec_category(root)
    cats = sorted(d for d in root.iterdir() if d.is_dir() and _is_mvtec_category(d))
    return [s for c in cats for s in _mvtec_category(c)]


def read_casting(root: Path) -> list[Sample]:
    samples = []
    for split in ("train", "test"):
        for kind, label in (("ok_front", 0), ("def_front", 1)):
            samples += [
                Sample(p, label, GOOD if label == 0 else "defect", "casting", None, split)
                for p in _images_in(root / split / kind)
            ]
    return samples


MAGNETIC_TILE_TEST_FRACTION = 0.3


def read_magnetic_tile(root: Path) -> list[Sample]:
    samples = []
    for type_dir in sorted(d for d in root.glob("MT_*") if d.is_dir()):
        kind = type_dir.name[3:]
        imgs = type_dir / "Imgs"
        for p in sorted(imgs.glob("*.jpg")) + sorted(imgs.glob("*.JPG")):
            mask = _find_mask([p.with_suffix(".png")])
            if kind == "Free":
                split = "test" if hash_fraction(p.name) < MAGNETIC_TILE_TEST_FRACTION else "train"
                samples.append(Sample(p, 0, GOOD, "magnetic_tile", None, split))
            else:
                samples.append(Sample(p, 1, kind, "magnetic_tile", mask, "test"))
    return samples


FOLDER_TEST_FRACTION = 0.3
_MASK_DIRS = ("masks", "ground_truth", "mask")


def _good_samples(paths: Sequence[Path], cls: str) -> list[Sample]:
    """Good images of the folder layout: 70 % train / 30 % test by file-name hash."""
    return [
        Sample(p, 0, GOOD, cls, None,
               "test" if hash_fraction(p.name) < FOLDER_TEST_FRACTION else "train")
        for p in paths
    ]


def _no_good_folder(root: Path, top: list[Path], subs: list[Path]) -> DatasetError:
    """The error for a folder-layout root without a good-parts folder, saying what it has."""
    good = "/, ".join(GOOD_NAMES) + "/"
    with_images = [d for d in subs if _images_in(d)]
    defect_dirs = [d for d in with_images if d.name.lower() in DEFECT_NAMES]
    if defect_dirs:
        listed = ", ".join(f"{d.name}/ ({_n_images(d)})" for d in defect_dirs)
        where = (f", and {len(top)} images directly inside: move the good ones into "
                 f"{root / GOOD}/" if top else f"; put the good images in {root / GOOD}/")
        return DatasetError(
            f"folder '{root}' has defect images in {listed} but no good-parts subfolder "
            f"({good}, any case){where} (or ok/, normal/)")
    n_sub = sum(len(_images_in(d)) for d in with_images)
    if n_sub:
        return DatasetError(
            f"folder '{root}' has {n_sub} images in subfolders but no good-parts subfolder "
            f"({good}, any case) and no images directly inside ({describe_folder(root)}); "
            f"the folder layout expects {LAYOUT_EXPECTS['folder']}; if they are all good "
            f"parts, give them with --good {root}")
    return DatasetError(
        f"folder '{root}' has no image files for the folder layout ({describe_folder(root)}); "
        f"it expects {LAYOUT_EXPECTS['folder']}")


def read_folder(root: Path) -> list[Sample]:
    """Good folder (good/ok/normal) + defect folders, or a flat folder of good images."""
    cls = root.name
    good_dir = _good_dir(root)
    subs = [d for d in _subfolders(root) if d.name.lower() not in _MASK_DIRS]
    if good_dir is None:
        top = _images_in(root)
        if top and not any(d.name.lower() in DEFECT_NAMES and _images_in(d) for d in subs):
            return _good_samples(top, cls)  # a plain folder of good images
        raise _no_good_folder(root, top, subs)
    # an empty good-parts folder is allowed, as an empty MVTec train/good/ is: the dataset
    # then has defect images only (evaluate warns that AUROC is undefined; fit finds no good
    # training images); with no defect images either, open_dataset says no images were found
    samples = _good_samples(_images_in(good_dir), cls)
    for type_dir in subs:
        if type_dir == good_dir:
            continue
        kind = type_dir.name
        for p in _images_in(type_dir):
            cands = []
            for md in _MASK_DIRS:
                base = root / md / kind
                cands += [base / f"{p.stem}_mask.png", base / f"{p.stem}.png", base / p.name]
            samples.append(Sample(p, 1, kind, cls, _find_mask(cands), "test"))
    return samples


READERS: dict[str, Callable[[Path], list[Sample]]] = {
    "mvtec": read_mvtec,
    "casting": read_casting,
    "magnetic-tile": read_magnetic_tile,
    "folder": read_folder,
}


def detect_format(root: Path) -> str:
    """Guess the layout of ``root`` from its folder names (see :data:`LAYOUTS` for the order)."""
    if (root / "train" / "ok_front").is_dir() or (root / "test" / "ok_front").is_dir():
        return "casting"
    if any(d.is_dir() and (d / "Imgs").is_dir() for d in root.glob("MT_*")):
        return "magnetic-tile"
    subs = _subfolders(root)
    if _is_mvtec_category(root) or any(_is_mvtec_category(d) for d in subs):
        return "mvtec"
    if _good_dir(root) is not None or _images_in(root):
        return "folder"
    if any(d.name.lower() in DEFECT_NAMES for d in subs):
        raise _no_good_folder(root, [], subs)
    expects = " | ".join(f"{name}: {LAYOUT_EXPECTS[name]}" for name in LAYOUTS)
    raise DatasetError(  # one line: the CLI promises one-line errors
        f"{root}: unknown dataset layout (tried {', '.join(LAYOUTS)}); found "
        f"{describe_folder(root)}. Expected {expects}. See `flawscope fit --help`, force a "
        "layout with --format, or give good images with --good DIR"
    )


def open_dataset(path: str | os.PathLike, format: str = "auto") -> Dataset:
    """Read the sample list of a dataset folder (no pixels are decoded here)."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (expected a dataset folder)")
    if format != "auto" and format not in READERS:
        raise DatasetError(f"--format {format}: unknown; choose from auto, {', '.join(READERS)}")
    fmt = detect_format(root) if format == "auto" else format
    samples = READERS[fmt](root)
    if not samples:
        raise DatasetError(
            f"{root}: no images found for the {fmt} layout, which expects "
            f"{LAYOUT_EXPECTS[fmt]}; found {describe_folder(root)}")
    return Dataset(root, fmt, samples)


def _image_files(item: Path, option: str) -> list[Path]:
    if item.is_dir():
        found = sorted(f for f in item.rglob("*") if f.is_file() and is_image_file(f))
        if not found:
            raise DatasetError(f"{option} {item}: no image files in this folder "
                               f"({describe_folder(item)})")
        return found
    if item.is_file():
        if not is_image_file(item):
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DatasetError(f"{option} {item}: not an image file name (expected {suffixes})")
        return [item]
    raise DatasetError(f"{option} {item}: no such file or folder")


def open_folders(
    good: Sequence[str | os.PathLike],
    defects: Sequence[str | os.PathLike] = (),
) -> Dataset:
    """A ``folder`` dataset from explicit image folders (searched recursively) or files.

    Good images split 70 % train / 30 % test by file-name hash, exactly as the folder layout
    does, so a later ``evaluate`` of the parent folder tests images the model never saw.
    Defect images are test samples; their defect type is their folder's name.
    """
    if not good:
        raise DatasetError("--good: give at least one folder or image of good parts")
    first = Path(good[0])
    root = first if first.is_dir() else first.parent
    if _is_good_name(root.name):
        root = root.parent
    cls = root.resolve().name
    samples = _good_samples([p for g in good for p in _image_files(Path(g), "--good")], cls)
    for item in defects:
        for p in _image_files(Path(item), "--defects"):
            samples.append(Sample(p, 1, p.parent.name, cls, None, "test"))
    return Dataset(root, "folder", samples)


def split_good(
    samples: Sequence[Sample | str | os.PathLike],
    validation_fraction: float = 0.1,
    calibration_fraction: float = 0.15,
) -> tuple[list, list, list]:
    """Split good training images (samples or paths) into (fit, validation, calibration) by
    file-name hash.

    The hash rule makes the split independent of file order and stable when files are added.
    Each non-empty part gets at least one image when there are at least three.
    """
    if validation_fraction < 0 or calibration_fraction < 0 or (
        validation_fraction + calibration_fraction >= 1
    ):
        raise DatasetError(
            "validation and calibration fractions must be >= 0 and sum to less than 1"
        )
    def path(s) -> Path:
        return s.path if isinstance(s, Sample) else Path(s)

    keyed = sorted(samples, key=lambda s: hash_fraction("split:" + path(s).name))
    n = len(keyed)
    n_cal = round(n * calibration_fraction)
    n_val = round(n * validation_fraction)
    if n >= 3:
        n_cal = max(n_cal, 1 if calibration_fraction > 0 else 0)
        n_val = max(n_val, 1 if validation_fraction > 0 else 0)
    cal, val, fit = keyed[:n_cal], keyed[n_cal : n_cal + n_val], keyed[n_cal + n_val :]
    order = {path(s): i for i, s in enumerate(samples)}
    return tuple(sorted(part, key=lambda s: order[path(s)]) for part in (fit, val, cal))
