"""Build a class + state task with a mirror-image state, for the per-class flip-rule ablation.

Design document 000 never flips ``metal_nut`` in training: its state ``flip`` is a nut placed
upside down, which on the photo is the mirror image of a good nut, so a flipped good nut *is*
a ``metal_nut-flip`` and flipping would teach the network wrong labels. The MVTec categories
under ``../shared/data`` (bottle, pill) have no such state, so this script constructs one from
real photos of a chiral part:

* ``--object pill`` (the one that works at the CPU budget): the good MVTec pills are split in
  two halves and one half is mirrored left-right, so its embossed "FF" reads backwards
  (``pill-flip``, as a nut placed upside down), beside ``pill-good`` and MVTec bottle's states
  (round bottles seen from above: flips are a valid augmentation for them).
* ``--object casting``: the cast pump impeller of ``casting/`` (its blades sweep one way, but
  they lie in the dark centre of the photo: the networks of the CPU budget do not learn the
  difference) as ``casting-flip`` beside ``casting-good``, ``casting-defect`` and magnetic-tile
  labels (``--casting-only``: without them).

It writes the mirrored images and a Dacon-style CSV (``file_name,class,state``, absolute
paths) to ``--out``; the ablation is then one ``classify grid`` run (README, "flip rule")::

    python benchmarks/make_flip_task.py --out .bench/flip-pill --object pill --per-label 150
    flawscope classify grid --csv .bench/flip-pill/flip-task.csv -o .bench/flip-grid \\
        --no-flip-classes pill --factors flip --flip-policies none,all \\
        --folds 2 --epochs 8 --image-size 192 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from common import data_root
from PIL import Image, ImageOps

from flawscope.classify.data import table_from_mvtec
from flawscope.errors import DatasetError
from flawscope.io import atomic_write_text

TILE_STATES = ("Free", "Blowhole", "Break", "Uneven")
OBJECTS = ("casting", "pill")


def _mirror(files: list[Path], out: Path) -> list[Path]:
    """Left-right mirrored copies of ``files`` under ``out/mirrored`` (lossless PNG: no new
    JPEG artefacts); existing ones are kept."""
    mirrored = out / "mirrored"
    mirrored.mkdir(parents=True, exist_ok=True)
    targets = []
    for p in files:
        target = mirrored / f"{p.parent.parent.name}_{p.parent.name}_{p.stem}_mirrored.png"
        if not target.exists():
            with Image.open(p) as im:
                ImageOps.mirror(im.convert("RGB")).save(target)
        targets.append(target)
    return targets


def _pick(files: list[Path], n: int, rng: np.random.Generator) -> list[Path]:
    return [files[i] for i in rng.permutation(len(files))[:n]]


def build_casting(
    data: Path, out: Path, per_label: int, seed: int, tile: bool = True
) -> list[tuple[str, str, str]]:
    """Casting good / flip / defect (+ four magnetic-tile labels unless ``tile=False``)."""
    rng = np.random.default_rng(seed)
    ok = sorted((data / "casting" / "train" / "ok_front").glob("*.jpeg"))
    bad = sorted((data / "casting" / "train" / "def_front").glob("*.jpeg"))
    if len(ok) < 2 * per_label or len(bad) < per_label:
        sys.exit(f"{data / 'casting'}: too few training images for {per_label} per label")
    ok, bad = _pick(ok, 2 * per_label, rng), _pick(bad, per_label, rng)
    rows = [(str(p.resolve()), "casting", "good") for p in ok[:per_label]]
    rows += [(str(p.resolve()), "casting", "defect") for p in bad]
    rows += [(str(p.resolve()), "casting", "flip") for p in _mirror(ok[per_label:], out)]
    for state in TILE_STATES if tile else ():
        files = sorted((data / "magnetic_tile" / f"MT_{state}" / "Imgs").glob("*.jpg"))
        rows += [(str(p.resolve()), "tile", state.lower()) for p in _pick(files, per_label, rng)]
    return rows


def build_pill(data: Path, out: Path, per_label: int, seed: int) -> list[tuple[str, str, str]]:
    """MVTec pill good / flip (the good pills split in two halves, one mirrored: the embossed
    "FF" reads backwards) beside MVTec bottle's states (not chiral)."""
    rng = np.random.default_rng(seed)
    mvtec = data / "mvtec_ad"
    images: dict[tuple[str, str], list[Path]] = {}  # (category, state) -> files, MVTec order
    try:
        table = table_from_mvtec([mvtec / "pill", mvtec / "bottle"])
    except DatasetError as exc:
        sys.exit(str(exc))
    for item in table.items:
        images.setdefault((item.object_class, item.state), []).append(item.path)
    good = images.get(("pill", "good"), [])
    if len(good) < 4:
        sys.exit(f"{mvtec / 'pill'}: {len(good)} good pill images, at least 4 needed")
    good = _pick(good, 2 * per_label, rng)
    half = len(good) // 2
    rows = [(str(p.resolve()), "pill", "good") for p in good[:half]]
    rows += [(str(p.resolve()), "pill", "flip") for p in _mirror(good[half:], out)]
    for (category, state), files in images.items():
        if category == "bottle":
            rows += [(str(p.resolve()), "bottle", state) for p in _pick(files, per_label, rng)]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the images and the CSV")
    p.add_argument("--per-label", type=int, default=120, help="images per label (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--object", choices=OBJECTS, default="casting",
                   help="the chiral part: casting impellers (with magnetic-tile labels) or "
                   "MVTec pills (with MVTec bottle's states)")
    p.add_argument("--casting-only", action="store_true",
                   help="--object casting: no magnetic-tile labels")
    args = p.parse_args(argv)
    if args.casting_only and args.object != "casting":
        p.error(f"--casting-only: only with --object casting (not {args.object})")
    if args.object == "pill":
        rows = build_pill(data_root(), args.out, args.per_label, args.seed)
    else:
        rows = build_casting(data_root(), args.out, args.per_label, args.seed,
                             tile=not args.casting_only)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("file_name", "class", "state"), *rows])
    target = args.out / "flip-task.csv"
    atomic_write_text(target, buf.getvalue())
    counts = Counter(f"{cls}-{state}" for _, cls, state in rows)
    print(f"{len(rows)} images, {len(counts)} labels written to {target}")
    for label, n in sorted(counts.items()):
        print(f"  {label}: {n}")


if __name__ == "__main__":
    main()
