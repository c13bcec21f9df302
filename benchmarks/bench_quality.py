"""Detection quality of every detector with its defaults, on every real dataset.

Each (detector, dataset) pair runs in its own process, exactly as a user's
``flawscope fit DATA --model M`` followed by ``flawscope evaluate``: :meth:`Inspector.train`
with no options but the model name (all good training images; threshold calibrated for at
most ``--max-frr`` false rejects), then :func:`flawscope.evaluation.evaluate` on the full test
split. Columns: image AUROC; pixel AUROC and AUPRO where the dataset has masks; the test
false-reject rate (FRR, good parts flagged) next to the target, and the recall of defects at
the calibrated threshold; how many out-of-sample scores the threshold was set on; fit seconds,
inference images/s (decode + resize + model + maps), and peak RSS of the process.

Datasets: MVTec AD categories under ``$FLAWSCOPE_DATA/mvtec_ad``, ``casting``,
``magnetic_tile`` (default ``../shared/data``).

    python benchmarks/bench_quality.py                          # feature detectors, all data
    python benchmarks/bench_quality.py --models patchcore --datasets pill --json out.json
    python benchmarks/bench_quality.py --models ncae conv-ae    # autoencoders (slow on CPU)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import data_root, peak_rss_mb, print_table, write_json  # noqa: E402

FEATURE_MODELS = ("patchcore", "padim")
#: the headline: recall of defects at each false-reject target (thresholds from the good
#: images' out-of-sample scores, as ``flawscope calibrate --max-frr`` sets them)
RECALL_TARGETS = (0.005, 0.01, 0.02, 0.05)
COLUMNS = ["dataset", "model", "image_auroc", *[f"recall@{t:g}" for t in RECALL_TARGETS],
           "frr_test", "pixel_auroc", "aupro", "pixel_f1", "region_p", "region_r", "region_f1",
           "fit_s", "img_per_s", "peak_rss_mb"]


def dataset_paths() -> dict[str, Path]:
    """Every real dataset: MVTec categories (``mvtec_<cat>``), casting, magnetic tile."""
    root = data_root()
    out: dict[str, Path] = {}
    mvtec = root / "mvtec_ad"
    if mvtec.is_dir():
        for cat in sorted(p for p in mvtec.iterdir() if (p / "train").is_dir()):
            out[cat.name] = cat
    for name in ("casting", "magnetic_tile"):
        if (root / name).is_dir():
            out[name] = root / name
    return out


def run_pair(model: str, dataset: str, path: Path, max_frr: float, threads: int | None,
             options: dict | None = None, save_dir: str | None = None) -> dict:
    """Fit with defaults (plus ``options``) and evaluate, in this process (the worker side)."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from flawscope.data.dataset import open_dataset
    from flawscope.evaluation import evaluate
    from flawscope.operating import operating_points
    from flawscope.pipeline import Inspector

    ds = open_dataset(path)
    t0 = time.perf_counter()
    insp = Inspector.train(ds, model, max_frr=max_frr, progress=False, **(options or {}))
    fit_s = time.perf_counter() - t0
    if save_dir:  # for bench_speed.py: the same fitted model, timed on a quiet machine
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        insp.save(Path(save_dir) / f"{dataset}-{model}.safetensors")
    res = evaluate(insp, ds, keep_maps=False)
    m = res.metrics
    labels = res.labels
    flagged = res.scores > res.threshold
    points = operating_points(insp.calibration_scores, res.scores, labels, RECALL_TARGETS) \
        if insp.calibration_scores is not None else []
    return {
        **{f"recall@{p.max_frr:g}": p.recall for p in points},
        **{f"frr_test@{p.max_frr:g}": p.frr_test for p in points},
        "pixel_f1": m.get("pixel_f1", float("nan")),
        "region_p": m.get("region_precision", float("nan")),
        "region_r": m.get("region_recall", float("nan")),
        "region_f1": m.get("region_f1", float("nan")),
        "pixel_threshold": m.get("pixel_threshold"),
        "options": options or {},
        "fit_timings": getattr(insp.detector, "fit_timings_", None),
        "dataset": dataset, "model": model,
        "image_auroc": m["image_auroc"], "pixel_auroc": m.get("pixel_auroc", float("nan")),
        "aupro": m.get("aupro", float("nan")),
        "frr_target": max_frr, "frr_test": float(flagged[labels == 0].mean()),
        "recall": float(flagged[labels == 1].mean()),
        "n_calibration": insp.threshold.n_good, "certified": insp.threshold.certified,
        "fit_s": fit_s, "img_per_s": m["images_per_second"], "peak_rss_mb": peak_rss_mb(),
        "input_size": list(insp.input_size), "n_train": insp.info["split"]["fit"],
        "n_test_good": int((labels == 0).sum()), "n_test_defect": int(labels.sum()),
        "threshold_note": insp.threshold.describe(),
        "f1_max": m["f1_max"], "image_auprc": m["image_auprc"],
        "mean_rate": float(np.mean(flagged)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(FEATURE_MODELS))
    p.add_argument("--datasets", nargs="+", help="default: every real dataset found")
    p.add_argument("--max-frr", type=float, default=0.01)
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    p.add_argument("--options", default="{}",
                   help='model options as JSON, e.g. \'{"image_score": "reweighted-max", '
                   '"positional": "none", "bank_size": null}\' (the previous defaults)')
    p.add_argument("--json", help="write the result rows to this JSON file")
    p.add_argument("--save-models", metavar="DIR",
                   help="keep each fitted model as DIR/DATASET-MODEL.safetensors")
    p.add_argument("--from-json", help="print the table of an earlier --json file")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "DATASET"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    paths = dataset_paths()
    if args.worker:
        model, name = args.worker
        print("RESULT " + json.dumps(run_pair(model, name, paths[name], args.max_frr,
                                              args.threads, json.loads(args.options),
                                              args.save_models)),
              flush=True)
        return 0
    if args.from_json:
        print_table(json.loads(Path(args.from_json).read_text()), COLUMNS)
        return 0
    names = args.datasets or list(paths)
    unknown = [n for n in names if n not in paths]
    if unknown:
        sys.exit(f"unknown or absent dataset(s) {unknown}: found {sorted(paths)}")
    rows = []
    for name in names:
        for model in args.models:
            cmd = [sys.executable, __file__, "--worker", model, name,
                   "--max-frr", str(args.max_frr), "--options", args.options]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.save_models:
                cmd += ["--save-models", args.save_models]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{model} on {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                rows.append({"dataset": name, "model": model, "image_auroc": "failed"})
            else:
                rows.append(json.loads(line[0][len("RESULT "):]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write_json(args.json, rows)  # rewritten after every run: nothing lost
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
