"""PatchCore and PaDiM: flawscope against anomalib, side by side, same data, same weights.

For every dataset and model, both libraries fit on the same good images and score the same
calibration and test images, each in its own process (``_bench_worker.py``), so that peak RSS
is one library's alone; anomalib runs in its own virtual environment
(``.bench/anomalib-venv``, created on first use by ``anomalib_venv.py``; anomalib is not a
flawscope dependency). Both get:

* the same backbone (default ``tf_efficientnet_lite0``) with the same ImageNet weights: the
  flawscope packaged weights are written as a timm state dict and loaded into anomalib's
  ``TimmFeatureExtractor`` (built with ``pre_trained=False``, so nothing is downloaded); the
  worker checks that both extract identical features on a fixed input;
* the same layers (the stride-8 and stride-16 stages), input size, normalisation, coreset
  ratio, ``num_neighbors`` (PatchCore) and ``n_features`` (PaDiM), and for PaDiM the very same
  random channel subset (flawscope's seeded choice is written into anomalib's ``idx``);
* the same images: fit = the ``fit`` part of flawscope's good split (what ``flawscope fit``
  trains on), calibration = its ``calibration`` part, test = the dataset's test split.

anomalib is driven through its Lightning module's torch model exactly as its ``training_step``
/ ``fit`` / ``predict_step`` do, batch by batch, without the Lightning Trainer, so its times
carry no Trainer overhead. Each library decodes and resizes images its own way (flawscope:
Pillow antialiased bilinear resampling to uint8; anomalib: Pillow decode + torchvision
antialiased resize).

Metrics are computed here, identically for both, with flawscope's metric code: image AUROC,
pixel AUROC and AUPRO (where the dataset has masks, at the model's input resolution), F1 at the
threshold calibrated on the calibration goods for at most ``--max-frr`` false rejects.
Throughput: fit seconds, inference images/s (decode + resize + model + maps), peak RSS
(``ru_maxrss``), and the backbone's raw forward images/s (timm ``features_only``, float32,
random input, no decoding): the ceiling for inference.

Datasets: ``casting`` and ``magnetic_tile`` under ``$FLAWSCOPE_DATA`` (default
``../shared/data``), and ``synthetic`` (flawscope's generator, categories tile and washer).

    python benchmarks/bench_anomalib.py --quick            # small end-to-end check
    python benchmarks/bench_anomalib.py                    # the full comparison
    python benchmarks/bench_anomalib.py --datasets casting --models patchcore --train-limit 500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import anomalib_venv  # noqa: E402

from flawscope.data.dataset import Sample, hash_fraction, open_dataset, split_good  # noqa: E402
from flawscope.data.images import read_mask  # noqa: E402
from flawscope.io import atomic_write_text  # noqa: E402
from flawscope.metrics import aupro, image_metrics, pixel_auroc  # noqa: E402
from flawscope.threshold import calibrate_good_quantile  # noqa: E402

DATA = Path(os.environ.get("FLAWSCOPE_DATA", ROOT.parent / "shared" / "data"))
BENCH = ROOT / ".bench"
WORKER = Path(__file__).resolve().parent / "_bench_worker.py"
DATASETS = ("bottle", "pill", "casting", "magnetic_tile", "synthetic")
#: dataset names that live below $FLAWSCOPE_DATA under another path
DATA_PATHS = {"bottle": "mvtec_ad/bottle", "pill": "mvtec_ad/pill"}
MODELS = ("patchcore", "padim")
LIBRARIES = ("flawscope", "anomalib")
#: a tie within this margin counts as "at least as accurate" (the figures are shown to 3 places)
AUROC_TIE = 5e-4


# ---------------------------------------------------------------------- data
def _take(samples: list[Sample], n: int | None, salt: str) -> list[Sample]:
    """A deterministic subset of ``n`` samples (by file-name hash), in the original order."""
    if n is None or len(samples) <= n:
        return list(samples)
    keep = set(sorted(range(len(samples)),
                      key=lambda i: hash_fraction(f"{salt}:{samples[i].path}"))[:n])
    return [s for i, s in enumerate(samples) if i in keep]


def load_splits(name: str, args: argparse.Namespace) -> list[tuple[str, dict]]:
    """[(dataset label, {"fit", "cal", "test"} sample lists)] for one dataset name."""
    if name == "synthetic":
        from flawscope.data.synthetic import generate_dataset

        root = generate_dataset(BENCH / "data" / "synthetic", seed=0)
        roots = [(f"synthetic-{c.name}", c) for c in sorted(root.iterdir()) if c.is_dir()]
    else:
        path = DATA / DATA_PATHS.get(name, name)
        if not path.is_dir():
            print(f"skipping {name}: {path} is absent (set FLAWSCOPE_DATA)", file=sys.stderr)
            return []
        roots = [(name, path)]
    out = []
    for label, root in roots:
        ds = open_dataset(root)
        fit, _, cal = split_good(ds.train)
        if args.recommended:  # what each library's users run: every good image is fitted on
            fit, cal = list(ds.train), []
        test = ds.test
        goods = _take([s for s in test if s.label == 0], args.test_limit, "test")
        defects = _take([s for s in test if s.label == 1], args.test_limit, "test")
        test = [s for s in test if s in goods or s in defects]
        out.append((label, {
            "fit": _take(fit, args.train_limit, "fit"),
            "cal": _take(cal, args.test_limit, "cal"),
            "test": test,
        }))
    return out


# ---------------------------------------------------------------------- shared weights
def prepare_backbone(args: argparse.Namespace) -> dict:
    """Write the flawscope backbone weights for anomalib, and reference features to check."""
    import torch
    from safetensors.torch import save_file

    from flawscope.backbones import FeatureExtractor, backbone_normalization

    torch.set_num_threads(args.threads)  # same kernels as the runs: features match closely
    out = BENCH / "weights"
    out.mkdir(parents=True, exist_ok=True)
    fe = FeatureExtractor(args.backbone, args.layers, device="cpu")
    names = fe.model.feature_info.module_name()
    if fe.strides != sorted(fe.strides):
        raise SystemExit("--layers must be given from shallow to deep (anomalib's order)")
    weights = out / f"{args.backbone}.safetensors"
    save_file({k: v.contiguous() for k, v in fe.model.state_dict().items()}, str(weights))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, args.image_size, args.image_size, generator=g)
    np.save(out / "check_input.npy", x.numpy())
    feats = []
    with torch.inference_mode():
        for i, f in enumerate(fe(x)):
            np.save(out / f"check_feature{i}.npy", f.numpy())
            feats.append(str(out / f"check_feature{i}.npy"))
    mean, std = backbone_normalization(args.backbone)
    from flawscope.models.padim import PaDiM

    channels = PaDiM(n_features=args.n_features, seed=0)._channel_index(sum(fe.channels))
    return {
        "padim_channels": channels.tolist(),
        "weights_file": str(weights), "layer_names": names, "mean": list(mean),
        "std": list(std), "weights": fe.describe(),
        "check": {"input": str(out / "check_input.npy"), "features": feats},
    }


# ---------------------------------------------------------------------- runs
def run_worker(job: dict, python: str, env_extra: dict, timeout: float) -> dict:
    job_file = Path(job["out"]).with_suffix(".json")
    job_file.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra)
    if job["library"] != "anomalib":
        env["PYTHONPATH"] = str(ROOT / "src")
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(WORKER), str(job_file)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        killed = " (SIGKILL: the out-of-memory killer?)" if proc.returncode == -9 else ""
        raise RuntimeError(f"{job['library']} {job['model']} on {job['dataset']} failed "
                           f"(exit {proc.returncode}{killed}):\n{tail}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = wall
    return res


def evaluate_run(res: dict, splits: dict, size: int, max_frr: float, masks) -> dict:
    data = np.load(Path(res["out"]))
    scores = data["scores"].astype(np.float64)
    n_cal = len(splits["cal"])
    cal, test = scores[:n_cal], scores[n_cal:]
    labels = np.array([s.label for s in splits["test"]])
    if n_cal:
        thr = calibrate_good_quantile(cal, max_frr).value
        m = image_metrics(labels, test, thr)
        out = {"image_auroc": m["image_auroc"], "f1": m["f1"], "threshold": thr}
    else:  # --recommended: no held-out goods; ranking metrics only
        m = image_metrics(labels, test, float(np.median(test)))
        out = {"image_auroc": m["image_auroc"]}
    if "threshold" in res:  # flawscope's own calibrated threshold (leave-one-out)
        flagged = test > res["threshold"]
        out.update(threshold=res["threshold"], frr_test=float(flagged[labels == 0].mean()),
                   recall=float(flagged[labels == 1].mean()))
    if masks is not None and "maps" in data:
        maps = data["maps"][n_cal:].astype(np.float32)
        out["pixel_auroc"] = pixel_auroc(masks, maps)
        out["aupro"] = aupro(masks, maps)
    return out


def write_results(args: argparse.Namespace, rows: list[dict]) -> str:
    """results.json and results.md under ``--out``, rewritten after every run; returns the md."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write_text(args.out / "results.json",
                      json.dumps({"config": config, "rows": rows}, indent=2, default=str))
    report = "\n".join([table(rows), "", *targets(rows)])
    atomic_write_text(args.out / "results.md", report + "\n")
    return report


def fmt(v, spec=".3f") -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return format(v, spec)


def table(rows: list[dict]) -> str:
    head = ["dataset", "model", "library", "image AUROC", "pixel AUROC", "AUPRO", "F1@cal",
            "fit s", "infer img/s", "peak RSS MB", "RSS over imports MB", "bank",
            "backbone raw img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "failed" in r:
            lines.append("| " + " | ".join([r["dataset"], r["model"], r["library"],
                                            f"failed: {r['failed']}"]
                                           + ["-"] * (len(head) - 4)) + " |")
            continue
        lines.append("| " + " | ".join([
            r["dataset"], r["model"], r["library"], fmt(r.get("image_auroc")),
            fmt(r.get("pixel_auroc")), fmt(r.get("aupro")), fmt(r.get("f1")),
            fmt(r["fit_s"], ".1f"), fmt(r["infer_ips"], ".1f"), fmt(r["rss_peak_mb"], ".0f"),
            fmt(r["rss_peak_mb"] - r["rss_start_mb"], ".0f"), str(r.get("bank") or "-"),
            fmt(r.get("backbone_raw_ips") or r.get("backbone_anomalib_ips"), ".1f"),
        ]) + " |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, per dataset and model, where both libraries ran."""
    out = []
    by = {(r["dataset"], r["model"], r["library"]): r for r in rows if "failed" not in r}
    for (ds, model, lib), ours in by.items():
        if lib != "flawscope" or (ds, model, "anomalib") not in by:
            continue
        theirs = by[(ds, model, "anomalib")]

        def rate(r):
            return (r["n_fit"] + r["n_score"]) / (r["fit_s"] + r["infer_s"])

        checks = [
            ("image AUROC >= anomalib", ours["image_auroc"] >= theirs["image_auroc"] - AUROC_TIE,
             f"{ours['image_auroc']:.3f} vs {theirs['image_auroc']:.3f}"),
        ]
        if "pixel_auroc" in ours and "pixel_auroc" in theirs:
            checks.append(("pixel AUROC >= anomalib",
                           ours["pixel_auroc"] >= theirs["pixel_auroc"] - AUROC_TIE,
                           f"{ours['pixel_auroc']:.3f} vs {theirs['pixel_auroc']:.3f}"))
        ratio = rate(ours) / rate(theirs)
        work_ours = ours["rss_peak_mb"] - ours["rss_start_mb"]
        work_theirs = theirs["rss_peak_mb"] - theirs["rss_start_mb"]
        checks += [
            ("fit+inference throughput >= 2x", ratio >= 2, f"{ratio:.1f}x"),
            ("peak RSS <= 1/2", ours["rss_peak_mb"] <= theirs["rss_peak_mb"] / 2,
             f"{ours['rss_peak_mb']:.0f} vs {theirs['rss_peak_mb']:.0f} MB; over imports "
             f"{work_ours:.0f} vs {work_theirs:.0f} MB"),
        ]
        within = ours["backbone_raw_ips"] / ours["infer_ips"]
        checks.append(("inference within 1.5x of raw backbone", within <= 1.5,
                       f"{within:.2f}x the backbone's time per image"))
        for what, ok, detail in checks:
            out.append(f"{'PASS' if ok else 'MISS'}  {ds} {model}: {what} ({detail})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--layers", type=json.loads, default=None,
                    help="JSON list of feature indices or module names (default: stride 8, 16)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--num-neighbors", type=int, default=9)
    ap.add_argument("--n-features", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-limit", type=int, default=None,
                    help="at most this many good fit images per dataset (anomalib's one-shot "
                    "coreset is quadratic in it; default 200, every image with --recommended)")
    ap.add_argument("--test-limit", type=int, default=None,
                    help="at most this many calibration goods, test goods and test defects")
    ap.add_argument("--limit", type=int, help="sets both --train-limit and --test-limit")
    ap.add_argument("--recommended", action="store_true",
                    help="each library at its recommended settings: anomalib's defaults "
                    "(256 px resize), flawscope's defaults (input size, aspect ratio, "
                    "calibration), every good training image, full test sets")
    ap.add_argument("--quick", action="store_true",
                    help="end-to-end check: 128 px, 40 fit images, 40 test images per label")
    ap.add_argument("--max-frr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for both libraries (busy shared machines)")
    ap.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                    help="fix glibc's mmap threshold for both libraries (MALLOC_MMAP_THRESHOLD_); "
                    "without it, anomalib's coreset loop fragments the heap and its RSS balloons")
    ap.add_argument("--bf16", action="store_true",
                    help="also run flawscope with precision='bf16' (row flawscope-bf16)")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per run")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--anomalib-python", help="python of an existing anomalib environment")
    args = ap.parse_args()
    train_limit = args.train_limit
    if args.quick:
        args.image_size, args.train_limit, args.test_limit = 128, 40, 40
    elif args.recommended:
        args.image_size, args.test_limit = 256, None
    else:
        args.train_limit = 200
    if train_limit is not None:  # an explicit limit wins (e.g. --recommended on a big set)
        args.train_limit = train_limit
    if args.limit is not None:
        args.train_limit = args.test_limit = args.limit

    libraries = args.libraries.split(",")
    anomalib_py = args.anomalib_python
    if "anomalib" in libraries and anomalib_py is None:
        anomalib_py = str(anomalib_venv.ensure())
    args.out.mkdir(parents=True, exist_ok=True)
    shared = prepare_backbone(args)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.bf16 and "flawscope" in libraries:
        libraries.insert(libraries.index("flawscope") + 1, "flawscope-bf16")
    print(f"{shared['weights']}; layers {shared['layer_names']}; {args.image_size} px; "
          f"coreset ratio {args.coreset_ratio}; {args.threads} thread(s)", file=sys.stderr)

    rows = []
    t_all = time.perf_counter()
    for name in args.datasets.split(","):
        for label, splits in load_splits(name, args):
            masks = None
            if any(s.mask_path is not None for s in splits["test"]):
                masks = np.stack([read_mask(s.mask_path, (args.image_size, args.image_size))
                                  for s in splits["test"]])
            print(f"[{label}] fit {len(splits['fit'])}, calibration {len(splits['cal'])}, "
                  f"test {len(splits['test'])} images", file=sys.stderr)
            for model in args.models.split(","):
                for lib in libraries:
                    job = {
                        "library": lib, "model": model, "dataset": label,
                        "image_size": args.image_size, "backbone": args.backbone,
                        "layers": args.layers, "coreset_ratio": args.coreset_ratio,
                        "num_neighbors": args.num_neighbors, "n_features": args.n_features,
                        "batch_size": args.batch_size, "threads": args.threads, "seed": 0,
                        "fit": [str(s.path) for s in splits["fit"]],
                        "score": [str(s.path) for s in splits["cal"] + splits["test"]],
                        "keep_maps": masks is not None,
                        "flawscope_defaults": args.recommended,
                        "out": str(args.out / f"{label}-{model}-{lib}.npz"),
                        **shared,
                    }
                    python = anomalib_py if lib == "anomalib" else sys.executable
                    try:
                        res = run_worker(job, python, env, args.timeout)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        # a run that dies (e.g. killed for memory) is a result, not the end
                        why = str(exc).splitlines()[0]
                        rows.append({"library": lib, "model": model, "dataset": label,
                                     "failed": why})
                        print(f"  {model:9s} {lib:14s} FAILED: {why}", file=sys.stderr)
                        write_results(args, rows)
                        continue
                    res["out"] = job["out"]
                    res.update(evaluate_run(res, splits, args.image_size, args.max_frr, masks))
                    rows.append(res)
                    print(f"  {model:9s} {lib:14s} AUROC {fmt(res['image_auroc'])} pixel "
                          f"{fmt(res.get('pixel_auroc'))} fit {res['fit_s']:.1f}s "
                          f"infer {res['infer_ips']:.1f} img/s RSS {res['rss_peak_mb']:.0f} MB"
                          + (f" (features differ by {res['feature_check_max_abs_diff']:.2g})"
                             if "feature_check_max_abs_diff" in res else ""),
                          file=sys.stderr)
                    write_results(args, rows)
    report = write_results(args, rows)
    print(report)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; results in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
