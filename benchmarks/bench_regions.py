"""Defect-region quality: pixel AUROC, AUPRO, pixel F1/IoU and region F1 per pixel rule.

Fits PatchCore (defaults) on a subset of the good training images of each dataset, keeps the
leave-one-out map statistics, scores the test split (cached as ``.npz`` under ``--cache``) and
compares pixel-threshold rules::

    FLAWSCOPE_DATA=../shared/data .venv/bin/python benchmarks/bench_regions.py \\
        --train 150 --cache /tmp/flawscope-regions
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

DATASETS = ("mvtec_ad/bottle", "mvtec_ad/pill", "magnetic_tile")
#: "max" is the default; "image": the image threshold (model files without a pixel threshold)
RULES = ("max", "image", "mean-q0.999", "mean-q0.99")


def cache_dataset(name: str, root: Path, cache: Path, n_train: int, test_step: int) -> Path:
    from flawscope.data.dataset import open_dataset
    from flawscope.data.images import image_dimensions, read_mask
    from flawscope.pipeline import Inspector

    out = cache / (name.replace("/", "_") + ".npz")
    if out.exists():
        return out
    data = open_dataset(root / name)
    rng = np.random.default_rng(0)
    train = [data.train[i] for i in sorted(rng.permutation(len(data.train))[:n_train])]
    inspector = Inspector.train(train, "patchcore", progress=False)
    det = inspector.detector
    test = data.test[::test_step]
    scores, maps = inspector.score(test)
    masks = np.stack([read_mask(s.mask_path, inspector.input_size) for s in test])
    np.savez_compressed(
        out, stats=det.calibration_map_stats_, scores=scores, maps=maps.astype(np.float32),
        masks=masks, labels=np.array([s.label for s in test]),
        sizes=np.array([image_dimensions(s.path) for s in test]),
        threshold=inspector.threshold.value, n_train=len(train),
    )
    return out


def analyse(path: Path, min_area: float) -> list[dict]:
    from flawscope.metrics import aupro, pixel_auroc, region_metrics
    from flawscope.regions import RegionRule, pixel_threshold_from_stats, region_mask

    z = np.load(path)
    maps, masks, scores = z["maps"], z["masks"], z["scores"]
    defect = scores > float(z["threshold"])
    base = {"dataset": path.stem, "n_train": int(z["n_train"]), "n_test": len(scores),
            "pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps)}
    rows = []
    for rule in RULES:
        t = (float(z["threshold"]) if rule == "image"
             else pixel_threshold_from_stats(z["stats"], rule))
        rr = RegionRule(t, min_region_area=min_area)
        pred = np.stack([region_mask(m, rr, tuple(s), defect=bool(d))
                         for m, s, d in zip(maps, z["sizes"], defect)])
        rows.append({**base, "rule": rule, "pixel_threshold": t,
                     **region_metrics(pred, masks)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=150)
    ap.add_argument("--test-step", type=int, default=0,
                    help="every k-th test image (default: 1, magnetic_tile 2)")
    ap.add_argument("--min-area", type=float, default=None)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/flawscope-regions"))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    args = ap.parse_args()
    root = Path(os.environ.get("FLAWSCOPE_DATA", "../shared/data"))
    args.cache.mkdir(parents=True, exist_ok=True)
    from flawscope.regions import DEFAULT_MIN_REGION_AREA

    min_area = DEFAULT_MIN_REGION_AREA if args.min_area is None else args.min_area
    for name in args.datasets.split(","):
        step = args.test_step or (2 if name == "magnetic_tile" else 1)
        path = cache_dataset(name, root, args.cache, args.train, step)
        for r in analyse(path, min_area):
            print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
