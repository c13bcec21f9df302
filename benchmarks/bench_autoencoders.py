"""NCAE vs conv-AE on real data: casting and magnetic tile.

Fits each autoencoder on the good training images (casting ``train/ok_front``; magnetic tile:
the documented 70 % of ``MT_Free``), calibrates the threshold on held-out goods (1 % target
false-reject rate), evaluates on the test split and prints one table:
image AUROC, AUPRC, F1 and accuracy at the calibrated threshold, pixel AUROC / AUPRO (tile),
fit seconds and inference images/s. Where the dataset has labelled training defects (casting
``train/def_front``) a second row gives the same model with the F1-optimal threshold,
calibrated on the held-out goods and half of those defects (never on test images).

    python benchmarks/bench_autoencoders.py                     # full run
    python benchmarks/bench_autoencoders.py --quick             # small smoke run
    python benchmarks/bench_autoencoders.py --from-models DIR   # re-evaluate saved models
"""

from __future__ import annotations

import argparse
import json
import time

from common import data_root, print_table, write_json

from flawscope.data import open_dataset, split_good
from flawscope.data.dataset import Dataset
from flawscope.evaluation import evaluate
from flawscope.metrics import image_metrics
from flawscope.pipeline import Inspector, _split_defects


def subsample(ds: Dataset, limit: int | None) -> Dataset:
    if not limit:
        return ds
    keep, seen = [], {}
    for s in ds.samples:
        key = (s.split, s.label)
        if seen.get(key, 0) < limit:
            keep.append(s)
            seen[key] = seen.get(key, 0) + 1
    return Dataset(ds.root, ds.format, keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="casting,magnetic_tile")
    ap.add_argument("--models", default="ncae,conv-ae")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--score", default=None, help="score rule (default: the model's)")
    ap.add_argument("--channels", type=int, choices=[1, 3],
                    help="input channels (default: the model's; design document 001: 1)")
    ap.add_argument("--limit", type=int, help="at most N images per split and label")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="--limit 64 --epochs 2 --image-size 64")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--save-models", help="folder to keep the fitted models in")
    ap.add_argument("--from-models", help="load DATASET-MODEL.safetensors from this folder "
                    "instead of fitting (fit seconds then come from --json-fit, if given)")
    ap.add_argument("--json-fit", help="an earlier --json output to take fit seconds from")
    args = ap.parse_args()
    if args.quick:
        args.limit, args.epochs, args.image_size = 64, 2, 64
    earlier = {}
    if args.json_fit:
        with open(args.json_fit) as fh:
            earlier = {(r["dataset"], r["model"]): r for r in json.load(fh)["rows"]}
    rows = []
    for name in args.datasets.split(","):
        ds = subsample(open_dataset(data_root() / name), args.limit)
        for model in args.models.split(","):
            saved = f"{args.from_models}/{name}-{model}.safetensors" if args.from_models else None
            if saved:
                insp = Inspector.load(saved, device=args.device)
                fit_s = earlier.get((name, model), {}).get("fit_s", float("nan"))
            else:
                opts = {"image_size": args.image_size, "epochs": args.epochs,
                        "device": args.device}
                if args.score:
                    opts["score_rule"] = args.score
                if args.channels:
                    opts["channels"] = args.channels
                t0 = time.perf_counter()
                insp = Inspector.train(ds, model, **opts)
                fit_s = time.perf_counter() - t0
                if args.save_models:
                    insp.save(f"{args.save_models}/{name}-{model}.safetensors")
            variants = [insp.threshold]
            if ds.train_defects:
                _, _, cal = split_good(ds.train)
                _, cal_defects = _split_defects(ds.train_defects)
                variants.append(insp.calibrate(cal, cal_defects, rule="f1-optimal").threshold)
            res = evaluate(insp, ds)
            for threshold in variants:
                m = {**res.metrics, **image_metrics(res.labels, res.scores, threshold.value)}
                rows.append({
                    "dataset": name, "model": model, "image_size": args.image_size,
                    "channels": args.channels or "default", "threshold": threshold.rule,
                    "image_auroc": m["image_auroc"], "image_auprc": m["image_auprc"],
                    "f1": m["f1"], "accuracy": m["accuracy"], "frr": m["false_reject_rate"],
                    "f1_max": m["f1_max"], "pixel_auroc": m.get("pixel_auroc", float("nan")),
                    "aupro": m.get("aupro", float("nan")), "fit_s": round(fit_s, 1),
                    "epochs": insp.detector.epochs_run_,
                    "img_per_s": round(res.metrics["images_per_second"], 1),
                })
                print_table(rows[-1:], list(rows[-1]))
    print()
    print(f"image size {args.image_size}, channels {args.channels or 'default'}, max epochs "
          f"{args.epochs}, limit {args.limit}")
    print_table(rows, list(rows[0]))
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
