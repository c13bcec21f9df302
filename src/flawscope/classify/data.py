"""Labelled images for the class + state classifier: label tables, subsets, the pixel cache.

A :class:`LabelTable` is a list of :class:`LabelledImage` (path, object class, state,
``class-state`` label). It comes from

* a CSV in the Dacon form ``index,file_name,class,state,label`` (:func:`read_label_csv`);
  ``label`` may be absent (derived as ``class-state``), ``class``/``state`` may be absent when
  ``label`` is there (split at the first ``-``), ``index`` is optional;
* any dataset folder the readers of :mod:`flawscope.data.dataset` understand
  (:func:`table_from_datasets`): MVTec, folder, casting, magnetic tile. Every split is used
  (all images are labelled); object class and defect type become class and state.

Several tables combine into one label space (:func:`combine_tables`).

Pixels are decoded and resized once into a ``uint8`` ``N x 3 x H x W`` ``.npy`` file that is
memory-mapped afterwards (:func:`cached_pixels`), keyed by a hash of the file list (path, size,
modification time) and the image size, so epochs, folds and later runs never decode again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flawscope.data.dataset import hash_fraction, open_dataset
from flawscope.data.images import as_size, load_images, read_image, resize
from flawscope.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

CHANNELS = 3  # timm backbones take RGB; gray images are replicated
CACHE_VERSION = 1
CSV_COLUMNS = ("index", "file_name", "class", "state", "label")


@dataclass(frozen=True)
class LabelledImage:
    """One labelled image; ``index`` and ``file_name`` as in the CSV row, if any."""

    path: Path
    object_class: str
    state: str
    label: str
    index: str | None = None
    file_name: str | None = None
    #: a crop ``(x0, y0, x1, y1)`` in original-image pixels (x1 / y1 exclusive), or None for
    #: the whole image (:mod:`flawscope.twostage`: the defect region of a type classifier)
    box: tuple[int, int, int, int] | None = None


@dataclass
class LabelTable:
    """Labelled images and where they came from."""

    items: list[LabelledImage]
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[Path]:
        return [it.path for it in self.items]

    @property
    def boxes(self) -> list[tuple[int, int, int, int] | None] | None:
        """Every item's crop box, or None when no item has one (whole images)."""
        boxes = [it.box for it in self.items]
        return boxes if any(b is not None for b in boxes) else None

    @property
    def labels(self) -> list[str]:
        """Sorted distinct labels: the label space."""
        return sorted({it.label for it in self.items})

    @property
    def classes(self) -> list[str]:
        return [it.object_class for it in self.items]

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(it.label for it in self.items).items()))

    def targets(self, labels: Sequence[str]) -> np.ndarray:
        """Index of every item's label in ``labels``; unknown labels raise naming them."""
        pos = {lab: i for i, lab in enumerate(labels)}
        unknown = sorted({it.label for it in self.items} - set(pos))
        if unknown:
            raise DatasetError(
                f"{len(unknown)} label(s) not in the model's label space: {_short(unknown)} "
                f"(model labels: {_short(list(labels))})"
            )
        return np.array([pos[it.label] for it in self.items], dtype=np.int64)

    def subset(self, indices: Iterable[int]) -> LabelTable:
        return LabelTable([self.items[i] for i in indices], list(self.sources))

    def describe(self) -> str:
        counts = self.counts()
        parts = ", ".join(f"{k} {v}" for k, v in counts.items())
        return f"{len(self)} images, {len(counts)} labels: {parts}"


def _short(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


# ----------------------------------------------------------------------------- CSV
def _resolve_image(name: str, dirs: Sequence[Path]) -> Path | None:
    p = Path(name)
    if p.is_absolute():
        return p if p.is_file() else None
    for d in dirs:
        if (d / p).is_file():
            return d / p
    return None


def read_label_csv(
    csv_path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    require_labels: bool = True,
) -> LabelTable:
    """Read a Dacon-style CSV into a :class:`LabelTable`.

    Image files are looked up in ``image_dir``; without it, next to the CSV and in the folder
    named like the CSV (``train.csv`` -> ``train/``), as in the Dacon download. With
    ``require_labels=False`` (prediction) only ``file_name`` is needed. Errors name the file,
    line and field.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"--csv {csv_path}: no such file")
    if image_dir is not None:
        dirs = [Path(image_dir)]
        if not dirs[0].is_dir():
            raise DatasetError(f"{dirs[0]}: image folder for {csv_path} does not exist")
    else:
        dirs = [csv_path.parent, csv_path.parent / csv_path.stem]
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: not a readable UTF-8 CSV file ({exc})") from None
    if not header:
        raise DatasetError(f"{csv_path}: empty file (expected a header {','.join(CSV_COLUMNS)})")
    missing = []
    if "file_name" not in header:
        missing.append("file_name")
    if require_labels and "label" not in header:
        missing += [c for c in ("class", "state") if c not in header]
    if missing:
        need = "file_name and label (or class and state)" if require_labels else "file_name"
        raise DatasetError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(header)}; "
            f"needs {need}"
        )
    if not rows:
        raise DatasetError(f"{csv_path}: no data rows after the header")
    items: list[LabelledImage] = []
    not_found: list[str] = []
    for line, row in enumerate(rows, start=2):
        name = (row.get("file_name") or "").strip()
        if not name:
            raise DatasetError(f"{csv_path} line {line}: empty file_name")
        cls = (row.get("class") or "").strip()
        state = (row.get("state") or "").strip()
        label = (row.get("label") or "").strip()
        if require_labels:
            if not label:
                if not cls or not state:
                    field_name = "class" if not cls else "state"
                    raise DatasetError(
                        f"{csv_path} line {line}: empty {field_name} (and no label) for {name}"
                    )
                label = f"{cls}-{state}"
            elif not cls:
                cls, _, rest = label.partition("-")
                state = state or rest
        index = (row.get("index") or "").strip() or None
        path = _resolve_image(name, dirs)
        if path is None:
            not_found.append(f"line {line}: {name}")
            continue
        items.append(LabelledImage(path, cls, state, label, index, name))
    if not_found:
        where = ", ".join(str(d) for d in dirs)
        hint = "" if image_dir is not None else "; give the image folder as DATA"
        raise DatasetError(
            f"{csv_path}: {len(not_found)} image file(s) not found in {where}: "
            f"{_short(not_found, 4)}{hint}"
        )
    return LabelTable(items, [str(csv_path)])


def table_from_mvtec(roots: Sequence[str | os.PathLike]) -> LabelTable:
    """Every image (``train/good`` and ``test/<type>``) of MVTec category folders, or of MVTec
    roots holding categories, labelled ``<category>-<type>`` (e.g. ``bottle-broken_large``)."""
    if not roots:
        raise DatasetError("no MVTec folders given")
    for r in roots:
        if not Path(r).is_dir():
            raise DatasetError(f"{r}: no such folder")
    return table_from_datasets(roots, "mvtec")


def write_label_csv(
    path: str | os.PathLike,
    table: LabelTable,
    image_root: str | os.PathLike | None = None,
    *,
    absolute: bool = False,
) -> Path:
    """Write ``table`` as a Dacon CSV ``index,file_name,class,state,label`` (atomically).

    ``file_name`` is relative to ``image_root`` (default: the CSV's folder, so that
    :func:`read_label_csv` finds the images without an image folder), or absolute with
    ``absolute=True``. Read it back with ``read_label_csv(path, image_root)``.
    """
    from flawscope.io import atomic_write_text

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"-o {path}: is a folder; give a CSV file name")
    base = Path(image_root if image_root is not None else path.parent).resolve()
    if image_root is not None and not base.is_dir():
        raise ConfigError(f"--image-root {image_root}: no such folder")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for i, it in enumerate(table.items):
        p = it.path.resolve()
        name = str(p) if absolute else Path(os.path.relpath(p, base)).as_posix()
        w.writerow([i, name, it.object_class, it.state, it.label])
    return atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- datasets
def table_from_datasets(
    paths: Sequence[str | os.PathLike], format: str = "auto"
) -> LabelTable:
    """Every image of the given dataset folders, labelled ``object_class-defect_type``."""
    if not paths:
        raise DatasetError("no data given: pass dataset folders, or --csv FILE")
    tables = []
    for p in paths:
        ds = open_dataset(p, format)
        items = [
            LabelledImage(s.path, s.object_class, s.defect_type, s.state_label)
            for s in ds.samples
        ]
        tables.append(LabelTable(items, [f"{ds.root} ({ds.format})"]))
    return combine_tables(tables)


def combine_tables(tables: Sequence[LabelTable]) -> LabelTable:
    """One label space from several tables; an image listed twice is kept once."""
    seen: set[Path] = set()
    items: list[LabelledImage] = []
    for t in tables:
        for it in t.items:
            key = it.path.resolve()
            if key in seen:
                continue
            seen.add(key)
            items.append(it)
    if not items:
        raise DatasetError("no labelled images found")
    return LabelTable(items, [s for t in tables for s in t.sources])


def load_table(
    data: Sequence[str | os.PathLike],
    csv_file: str | os.PathLike | None = None,
    format: str = "auto",
) -> LabelTable:
    """The CLI rule: with ``csv_file``, DATA is at most one image folder; else dataset folders."""
    if csv_file is not None:
        if len(data) > 1:
            raise ConfigError(
                f"--csv {csv_file}: give at most one image folder as DATA (got {len(data)})"
            )
        return read_label_csv(csv_file, data[0] if data else None)
    return table_from_datasets(data, format)


def stratified_sample(
    table: LabelTable,
    limit: int | None = None,
    max_per_label: int | None = None,
    min_per_label: int = 2,
    seed: int = 0,
) -> LabelTable:
    """A deterministic, label-stratified subset (order of ``table`` kept).

    ``max_per_label`` caps each label; ``limit`` then keeps ``limit`` images: at least
    ``min_per_label`` per label (or all it has), the rest in the labels' proportions. Which images
    are kept depends on a hash of their file path and ``seed`` only.
    """
    by_label: dict[str, list[int]] = {}
    for i, it in enumerate(table.items):
        by_label.setdefault(it.label, []).append(i)
    for lab, idx in by_label.items():
        idx.sort(key=lambda i: hash_fraction(f"{seed}:{table.items[i].path}"))
        if max_per_label is not None:
            by_label[lab] = idx[: max(1, max_per_label)]
    total = sum(len(v) for v in by_label.values())
    if limit is not None and limit < total:
        # each label keeps min_per_label (or all it has); the rest of the limit is shared in
        # proportion to what is left of each label (largest remainders)
        names = sorted(by_label)
        base = {lab: min(len(by_label[lab]), min_per_label) for lab in names}
        left = {lab: len(by_label[lab]) - base[lab] for lab in names}
        room = max(0, limit - sum(base.values()))
        pool = sum(left.values())
        share = {lab: room * left[lab] / pool if pool else 0.0 for lab in names}
        extra = {lab: int(share[lab]) for lab in names}
        for lab in sorted(names, key=lambda x: extra[x] - share[x])[: room - sum(extra.values())]:
            extra[lab] += 1
        for lab in names:
            by_label[lab] = by_label[lab][: base[lab] + min(extra[lab], left[lab])]
    keep = sorted(i for idx in by_label.values() for i in idx)
    return table.subset(keep)


# ----------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$FLAWSCOPE_CACHE`` or ``~/.cache/flawscope`` (``$XDG_CACHE_HOME`` respected)."""
    env = os.environ.get("FLAWSCOPE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flawscope"


Box = tuple[int, int, int, int]


def cache_key(
    paths: Sequence[Path], size: tuple[int, int], boxes: Sequence[Box | None] | None = None
) -> str:
    """Hash of (resolved path, byte size, mtime) of every file, the size and cache version,
    and with ``boxes`` every crop box."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, list(size), CHANNELS]).encode())
    for i, p in enumerate(paths):
        try:
            st = p.stat()
        except OSError as exc:
            raise DatasetError(f"{p}: cannot read image file ({exc.strerror})") from None
        box = "" if boxes is None or boxes[i] is None else "\0" + ",".join(map(str, boxes[i]))
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}{box}\n".encode())
    return h.hexdigest()[:24]


def crop_pixels(image: np.ndarray, box: Box | None, size: tuple[int, int]) -> np.ndarray:
    """``H x W x C`` uint8 -> the ``box`` (x0, y0, x1, y1; clipped to the image) resized to
    ``size``; ``box=None``: the whole image."""
    if box is not None:
        h, w = image.shape[:2]
        x0, y0, x1, y1 = (int(v) for v in box)
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        x1, y1 = max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)
        image = np.ascontiguousarray(image[y0:y1, x0:x1])
    return resize(image, size)


def load_crops(
    paths: Sequence[Path], boxes: Sequence[Box | None], size: tuple[int, int]
) -> np.ndarray:
    """``uint8 N x 3 x H x W``: each image's box (or all of it) at ``size``."""
    out = [crop_pixels(read_image(p, channels=CHANNELS), b, size) for p, b in zip(paths, boxes)]
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))


def _decode_into(
    out: np.ndarray, paths: Sequence[Path], size: tuple[int, int], progress: bool, chunk: int,
    boxes: Sequence[Box | None] | None = None,
) -> None:
    from flawscope.training import progress_bar

    with progress_bar(len(paths), "decoding images (once)", progress) as bar:
        for i in range(0, len(paths), chunk):
            part = paths[i : i + chunk]
            if boxes is None:
                out[i : i + len(part)] = load_images(part, size, CHANNELS).pixels
            else:
                out[i : i + len(part)] = load_crops(part, boxes[i : i + chunk], size)
            bar.update(len(part))


def cached_pixels(
    paths: Sequence[str | os.PathLike],
    image_size: int | Sequence[int],
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    chunk: int = 256,
    boxes: Sequence[Box | None] | None = None,
) -> np.ndarray:
    """``uint8 N x 3 x H x W`` pixels of ``paths``, decoded at most once.

    With ``cache_dir`` the array is a read-only memory map of ``<cache_dir>/classify-<key>.npy``
    (built atomically on the first call); with ``None`` it is decoded into memory. ``boxes``:
    one crop box (or None: the whole image) per path (:func:`crop_pixels`).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise DatasetError("no images to decode (empty dataset)")
    if boxes is not None and len(boxes) != len(paths):
        raise ConfigError(f"{len(boxes)} crop boxes for {len(paths)} images")
    size = as_size(image_size)
    shape = (len(paths), CHANNELS, *size)
    if cache_dir is None:
        out = np.empty(shape, dtype=np.uint8)
        _decode_into(out, paths, size, progress, chunk, boxes)
        return out
    folder = Path(cache_dir)
    target = folder / f"classify-{cache_key(paths, size, boxes)}.npy"
    if target.is_file():
        try:
            arr = np.load(target, mmap_mode="r")
            if arr.shape == shape and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass
        log.warning("%s: cache file damaged or of another shape; rebuilding it", target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{target.name}.{os.getpid()}.tmp"
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        try:
            _decode_into(mm, paths, size, progress, chunk, boxes)
            mm.flush()
            del mm
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cache folder {folder}: cannot write the image cache ({exc.strerror or exc}); "
            "choose another with --cache-dir or FLAWSCOPE_CACHE"
        ) from None
    log.info("image cache written: %s (%.0f MB)", target, target.stat().st_size / 1e6)
    return np.load(target, mmap_mode="r")


def channel_stats(
    pixels: np.ndarray, indices: Sequence[int] | None = None, chunk: int = 256
) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation in [0, 1] over all pixels of the images.

    Exact (from per-channel histograms of the uint8 values), in bounded memory.
    """
    idx = np.arange(len(pixels)) if indices is None else np.sort(np.asarray(indices))
    if len(idx) == 0:
        raise DatasetError("no training images to compute the normalisation from")
    c = pixels.shape[1]
    hist = np.zeros((c, 256), dtype=np.int64)
    for i in range(0, len(idx), chunk):
        block = np.asarray(pixels[idx[i : i + chunk]])
        for ch in range(c):
            hist[ch] += np.bincount(block[:, ch].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum(axis=1)
    mean = hist @ values / n
    var = hist @ values**2 / n - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    std[std < 1e-4] = 1.0  # a constant channel: do not blow it up
    return [float(v) for v in mean], [float(v) for v in std]
