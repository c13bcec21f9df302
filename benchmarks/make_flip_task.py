"""Build a class + state task with a mirror-image state, for the per-class flip-rule ablation.

Design document 000 never flips ``metal_nut`` in training: its state ``flip`` is a nut placed
upside down, which on the photo is the mirror image of a good nut, so a flipped good nut *is*
a ``metal_nut-flip`` and flipping would teach the network wrong labels. The MVTec categories
under ``../shared/data`` (bottle, pill) have no such state, so this script constructs one from
real photos: the cast pump impeller of ``casting/`` is chiral (its blades sweep one way), and
``casting-flip`` holds left-right mirrored photos of good impellers (other photos than those in
``casting-good``), beside ``casting-good`` and ``casting-defect``. Magnetic-tile classes (not
chiral: flips are a valid augmentation for them) complete the task.

It writes the mirrored images and a Dacon-style CSV (``file_name,class,state``, absolute
paths) to ``--out``; the ablation is then one ``classify grid`` run (README, "flip rule")::

    python benchmarks/make_flip_task.py --out .bench/flip-task
    flawscope classify grid --csv .bench/flip-task/flip-task.csv -o .bench/flip-grid \\
        --no-flip-classes casting --factors flip --flip-policies none,all \\
        --folds 2 --epochs 6 --image-size 128 --refit none --threads 1
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

from flawscope.io import atomic_write_text

TILE_STATES = ("Free", "Blowhole", "Break", "Uneven")


def build(data: Path, out: Path, per_label: int, seed: int) -> list[tuple[str, str, str]]:
    """Write the mirrored images under ``out/mirrored``; return (path, class, state) rows."""
    rng = np.random.default_rng(seed)
    ok = sorted((data / "casting" / "train" / "ok_front").glob("*.jpeg"))
    bad = sorted((data / "casting" / "train" / "def_front").glob("*.jpeg"))
    if len(ok) < 2 * per_label or len(bad) < per_label:
        sys.exit(f"{data / 'casting'}: too few training images for {per_label} per label")
    ok = [ok[i] for i in rng.permutation(len(ok))[: 2 * per_label]]
    bad = [bad[i] for i in rng.permutation(len(bad))[:per_label]]
    rows = [(str(p.resolve()), "casting", "good") for p in ok[:per_label]]
    rows += [(str(p.resolve()), "casting", "defect") for p in bad]
    mirrored = out / "mirrored"
    mirrored.mkdir(parents=True, exist_ok=True)
    for p in ok[per_label:]:
        target = mirrored / (p.stem + "_mirrored.png")  # lossless: no new JPEG artefacts
        if not target.exists():
            with Image.open(p) as im:
                ImageOps.mirror(im.convert("RGB")).save(target)
        rows.append((str(target.resolve()), "casting", "flip"))
    for state in TILE_STATES:
        files = sorted((data / "magnetic_tile" / f"MT_{state}" / "Imgs").glob("*.jpg"))
        files = [files[i] for i in rng.permutation(len(files))[:per_label]]
        rows += [(str(p.resolve()), "tile", state.lower()) for p in files]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the images and the CSV")
    p.add_argument("--per-label", type=int, default=120, help="images per label (at most)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = build(data_root(), args.out, args.per_label, args.seed)
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
