"""Ablation of detector settings across every real dataset: how the defaults were chosen.

Each configuration (a model name and keyword options) is fitted on the good training images
of every dataset (optionally a deterministic subset) and scored on its test split; the table
gives image AUROC, pixel AUROC (with masks) and times per dataset and configuration, and the
mean over datasets. For PatchCore, anomaly-map smoothing only changes the maps, so
``--sigmas`` re-smooths the same raw patch maps instead of refitting (other models ignore
``--sigmas``: give ``map_sigma`` in the config). A second table leaves each dataset out in
turn: the configuration that wins on the *other* datasets, and its score on the one left out.

    python benchmarks/ablate_detectors.py --config 'patchcore:image_size=224' \\
        --config 'patchcore:image_size=256' --json .bench/ablation.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import data_root, print_table  # noqa: E402  (also puts src/ on sys.path)

from flawscope.data.dataset import Sample, hash_fraction, open_dataset  # noqa: E402
from flawscope.data.images import read_mask  # noqa: E402
from flawscope.metrics import image_metrics, pixel_auroc  # noqa: E402

DATASETS = {
    "bottle": "mvtec_ad/bottle",
    "pill": "mvtec_ad/pill",
    "metal_nut": "mvtec_ad/metal_nut",
    "casting": "casting",
    "magnetic_tile": "magnetic_tile",
}


def parse_config(text: str) -> tuple[str, dict]:
    """``'patchcore:image_size=256,layers=[2,3]'`` -> ``("patchcore", {...})``."""
    model, _, rest = text.partition(":")
    options: dict = {}
    for part in _split_top(rest):
        if not part:
            continue
        key, _, value = part.partition("=")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return model.strip(), options


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def take(samples: list[Sample], n: int | None, salt: str) -> list[Sample]:
    if n is None or len(samples) <= n:
        return list(samples)
    order = sorted(samples, key=lambda s: hash_fraction(f"{salt}:{s.path.name}"))
    return order[:n]


def run_one(model: str, options: dict, name: str, args) -> list[dict]:
    import torch

    from flawscope.models import create
    from flawscope.nn.blur import GaussianBlur2d

    ds = open_dataset(data_root() / DATASETS[name])
    train = take(ds.train, args.train_limit, "fit")
    test = ds.test
    labels = np.array([s.label for s in test])
    # re-smoothing raw maps is only valid where the image score does not depend on the map's
    # smoothing (PatchCore's score is the re-weighted patch distance; PaDiM's is the maximum
    # of the smoothed map, so PaDiM is fitted per sigma instead)
    resmooth = bool(args.sigmas) and model.startswith("patchcore")
    sigmas = args.sigmas if resmooth else [None]
    opts = dict(options)
    if resmooth:
        opts["map_sigma"] = 0.0
    det = create(model, progress=False, **opts)
    t0 = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, maps = det.score(test, with_maps=True)
    infer = len(test) / (time.perf_counter() - t0)
    masks = None
    if ds.has_masks:
        masks = np.stack([read_mask(s.mask_path, det.input_size) for s in test])
    rows = []
    for sigma in sigmas:
        m = maps
        if sigma is not None:
            with torch.no_grad():
                m = GaussianBlur2d(sigma)(torch.from_numpy(maps)[:, None])[:, 0].numpy()
        row = {
            "config": _label(model, options, sigma), "dataset": name, "n_train": len(train),
            "image_auroc": image_metrics(labels, scores, float(np.median(scores)))["image_auroc"],
            # defects caught at the threshold users get: at most 1 % of the out-of-sample
            # (leave-one-image-out) training-good scores above it
            "recall_at_1pct": recall_at(det, scores, labels, 0.01),
            "pixel_auroc": pixel_auroc(masks, m) if masks is not None else float("nan"),
            "fit_s": fit_s, "img_per_s": infer,
            "input_size": list(det.input_size),
        }
        rows.append(row)
    return rows


def recall_at(det, scores: np.ndarray, labels: np.ndarray, max_frr: float) -> float:
    """Recall of the test defects at the good-quantile threshold of the detector's own
    out-of-sample calibration scores (NaN for detectors without them)."""
    from flawscope.threshold import calibrate_good_quantile

    calib = getattr(det, "calibration_scores_", None)
    if calib is None or not (labels == 1).any():
        return float("nan")
    t = calibrate_good_quantile(np.asarray(calib, dtype=np.float64), max_frr).value
    return float((scores[labels == 1] > t).mean())


def _label(model: str, options: dict, sigma) -> str:
    opts = dict(options)
    if sigma is not None:
        opts["map_sigma"] = sigma
    return model + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


def lodo(rows: list[dict], metric: str) -> list[dict]:
    """For each dataset: the config best on the mean of the others, and its held-out score."""
    datasets = sorted({r["dataset"] for r in rows})
    configs = sorted({r["config"] for r in rows})
    val = {(r["config"], r["dataset"]): r[metric] for r in rows}
    out = []
    for held in datasets:
        others = [d for d in datasets if d != held]
        complete = [c for c in configs if all((c, d) in val for d in datasets)]
        if not complete or not others:
            continue
        best = max(complete, key=lambda c: np.nanmean([val[(c, d)] for d in others]))
        out.append({"held_out": held, "chosen_on_others": best,
                    metric + "_held_out": val[(best, held)],
                    "best_possible": max(val[(c, held)] for c in complete)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", required=False, default=[],
                   help="MODEL:key=value,... (repeatable)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--train-limit", type=int, default=None,
                   help="at most this many good training images per dataset (hash subset)")
    p.add_argument("--sigmas", type=float, nargs="*", default=None,
                   help="map smoothing values to compare on the same fit")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="append result rows (JSON lines) to this file")
    p.add_argument("--from-json", help="only print tables from this JSON-lines file")
    p.add_argument("--metric", default="image_auroc")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    if args.from_json:
        rows = [json.loads(line) for line in Path(args.from_json).read_text().splitlines() if line]
    for text in args.config:
        model, options = parse_config(text)
        for name in args.datasets:
            new = run_one(model, options, name, args)
            for r in new:
                print(json.dumps(r), file=sys.stderr, flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
            rows += new
    if not rows:
        return 0
    table: dict[str, dict] = {}
    for r in rows:
        t = table.setdefault(r["config"], {"config": r["config"]})
        t[r["dataset"]] = r[args.metric]
    for t in table.values():
        vals = [t[d] for d in DATASETS if d in t]
        t["mean"] = float(np.nanmean(vals)) if vals else float("nan")
    print_table(sorted(table.values(), key=lambda t: -t["mean"]),
                ["config", *[d for d in DATASETS if any(d in t for t in table.values())], "mean"])
    print()
    print_table(lodo(rows, args.metric), ["held_out", "chosen_on_others",
                                          args.metric + "_held_out", "best_possible"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
