"""Where the time goes: fitted detectors at their defaults against the backbone alone.

For each model file ``DIR/DATASET-MODEL.safetensors`` (``bench_quality.py --save-models DIR``
fits them with the defaults, exactly as ``flawscope fit``), in its own process, on the test
images of the dataset:

- ``predict img/s``: ``Inspector.predict`` on the image files at the default runtime (``auto``:
  the onnxruntime graph that ``flawscope fit`` caches; ``prepare_s`` = the time to export and
  cache it, measured here in a fresh cache), what ``flawscope predict`` runs: decode, resize,
  model, maps, regions; ``torch img/s``: the same with ``--runtime torch``. The headline is
  ``ratio`` = predict / ``backbone img/s`` (target >= 0.7), the backbone alone in PyTorch
  (forward to its deepest used stage) on the already decoded images, same input size, batch
  and threads.
- ``cli s`` / ``cli RSS``: ``flawscope predict MODEL TEST_IMAGES --json`` as a user runs it, in
  a child process (start-up included) and its peak resident memory, at the default runtime
  and with ``--runtime torch``;
- the split of one PyTorch pass, per image (ms): decode + resize, backbone, patch embedding
  (pooling, upsampling, channel reduction), scorer (neighbour search / Mahalanobis), head
  (positional normalisation, smoothing, image score), regions (from the maps, in original
  pixels);
- fit, from the model file's own timings (features, coreset, calibration) against one backbone
  pass (decode included) over the training images: ``fit / backbone`` (target <= 3);
- image and pixel AUROC at the default runtime, and the largest score deviation from PyTorch.

    python benchmarks/bench_quality.py --save-models /tmp/models --json q.json
    python benchmarks/bench_speed.py /tmp/models --quality q.json --threads 2 --json speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb, print_table, write_json  # noqa: E402

COLUMNS = ["dataset", "model", "image_auroc", "pixel_auroc", "backbone_img_s", "e2e_img_s",
           "ratio", "torch_img_s", "max_score_dev", "prepare_s", "cli_s", "cli_rss_mb",
           "cli_torch_s", "cli_torch_rss_mb", "decode_ms", "backbone_ms", "embed_ms",
           "search_ms", "head_ms", "regions_ms", "fit_s", "fit_backbone_s", "fit_ratio"]


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _parts(module):
    """(embeddings, scorer of one embedding's output) of a PatchCore / PaDiM scorer, or of
    every member of an ensemble."""
    members = list(getattr(module, "members", [module]))
    return [m.embedding for m in members], members


def _backbone_seconds(emb, x) -> float:
    """Seconds of the backbone alone on uint8 ``x`` (its input prepared as the embedding
    prepares it, not timed)."""
    import torch

    pre = emb.extractor.preprocess(x).contiguous(memory_format=torch.channels_last)
    return _timed(emb.extractor, pre)[1]


def split_times(inspector, batches: list) -> tuple[dict[str, float], list]:
    """Seconds per stage over ``batches`` (uint8 tensors), each stage timed on its own, and
    the anomaly maps of the whole pass (numpy, one array per batch)."""
    import torch

    module = inspector.detector.inference_module()
    embeddings, members = _parts(module)
    t = dict.fromkeys(("backbone", "embed", "search", "total"), 0.0)
    maps = []
    with torch.inference_mode():
        for x in batches:
            for emb in embeddings:
                t["backbone"] += _backbone_seconds(emb, x)
                t["embed"] += _timed(emb, x)[1]
            for m in members:
                if hasattr(m, "patch_scores"):
                    t["search"] += _timed(m.patch_scores, x)[1]
                elif hasattr(m, "distances"):
                    t["search"] += _timed(m.distances, x)[1]
            (_, amap), seconds = _timed(module, x)
            t["total"] += seconds
            maps.append(amap.numpy())
    return {"backbone": t["backbone"], "embed": t["embed"] - t["backbone"],
            "search": t["search"] - t["embed"], "head": t["total"] - t["search"]}, maps


def backbone_pass(inspector, paths: list, batch: int) -> tuple[float, float]:
    """(seconds for decode + backbone over ``paths``, of which the backbone alone)."""
    import torch

    from flawscope.data.source import iter_batches

    embeddings, _ = _parts(inspector.detector.inference_module())
    t0, t_net = time.perf_counter(), 0.0
    with torch.inference_mode():
        for arr, _ in iter_batches(paths, inspector.input_size, inspector.channels, batch):
            x = torch.from_numpy(arr)
            t_net += sum(_backbone_seconds(emb, x) for emb in embeddings)
    return time.perf_counter() - t0, t_net


def cli_predict(model_path: Path, images: list[str], threads: int | None, runtime: str
                ) -> tuple[float, float]:
    """(seconds, peak RSS MB) of ``flawscope predict MODEL IMAGE... --json`` in a child."""
    import resource

    cmd = [sys.executable, "-m", "flawscope", "predict", str(model_path), *images, "--json",
           "--device", "cpu", "--runtime", runtime]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr[-1000:]}")
    # children's maximum: each call is measured in a fresh worker process (see main)
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_one(model_path: Path, dataset_path: Path, threads: int | None, max_test: int | None,
            part: str) -> dict:
    import os
    import tempfile

    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    os.environ["FLAWSCOPE_CACHE"] = os.environ.get("BENCH_CACHE") or tempfile.mkdtemp()
    from flawscope.data.dataset import open_dataset
    from flawscope.data.images import read_mask
    from flawscope.data.source import iter_batches
    from flawscope.fastruntime import select_runtime
    from flawscope.metrics import image_metrics, pixel_auroc
    from flawscope.pipeline import Inspector, make_predictions

    ds = open_dataset(dataset_path)
    if part in ("cli", "cli-torch"):  # a fresh process per measurement: its own peak RSS
        insp = Inspector.load(model_path, device="cpu")
        select_runtime(insp, model_path, "auto", prepare_missing=True)  # as fit leaves it
        runtime = "torch" if part == "cli-torch" else "auto"
        seconds, rss = cli_predict(model_path, [str(t.path) for t in ds.test], threads,
                                   runtime)
        key = "cli_torch" if part == "cli-torch" else "cli"
        return {f"{key}_s": seconds, f"{key}_rss_mb": rss}
    insp = Inspector.load(model_path, device="cpu")
    det = insp.detector
    test = list(ds.test)
    if max_test and len(test) > max_test:  # every k-th image: goods and defects alike
        test = test[:: -(-len(test) // max_test)]
    paths = [s.path for s in test]
    labels = np.array([s.label for s in test])
    batch = det.batch_size
    n = len(paths)

    insp.predict(paths[: min(4, n)])  # warm-up: first-call allocations, lazy imports
    preds, torch_s = _timed(lambda: insp.predict(paths, with_maps=True))
    scores = np.array([p.score for p in preds])
    del preds
    fast = Inspector.load(model_path, device="cpu")
    _, prepare_s = _timed(lambda: select_runtime(fast, model_path, "auto",
                                                 prepare_missing=True))
    fast.predict(paths[: min(4, n)])
    preds, e2e_s = _timed(lambda: fast.predict(paths, with_maps=True))
    fast_scores = np.array([p.score for p in preds])
    row: dict = {"n_test": n, "threads": torch.get_num_threads(), "batch": batch,
                 "input_size": list(insp.input_size), "e2e_img_s": n / e2e_s,
                 "runtime": fast.runtime, "prepare_s": prepare_s, "torch_img_s": n / torch_s,
                 "max_score_dev": float(np.max(np.abs(fast_scores - scores)))}
    row["image_auroc"] = image_metrics(labels, fast_scores,
                                       insp.threshold.value)["image_auroc"]
    row["torch_image_auroc"] = image_metrics(labels, scores, insp.threshold.value)["image_auroc"]
    if any(s.mask_path is not None for s in test):
        masks = np.stack([read_mask(s.mask_path, insp.input_size) for s in test])
        row["pixel_auroc"] = pixel_auroc(masks, np.stack([p.anomaly_map for p in preds]))
    del preds

    decoded, decode_s = [], 0.0
    it = iter_batches(paths, insp.input_size, insp.channels, batch)
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        decode_s += time.perf_counter() - t0
        if item is None:
            break
        decoded.append(torch.from_numpy(item[0]))
    split, maps = split_times(insp, decoded)
    all_maps = np.concatenate(maps)
    rule = insp.region_rule()
    _, regions_s = _timed(lambda: make_predictions(
        paths, scores, all_maps, insp.threshold, insp.normalization, rule))
    row.update({f"{k}_ms": 1000 * v / n for k, v in split.items()})
    row["decode_ms"] = 1000 * decode_s / n
    row["regions_ms"] = 1000 * regions_s / n
    row["backbone_img_s"] = n / split["backbone"]
    row["ratio"] = row["e2e_img_s"] / row["backbone_img_s"]
    row["torch_ratio"] = row["torch_img_s"] / row["backbone_img_s"]
    row["fit_timings"] = getattr(det, "fit_timings_", {})
    train = [s.path for s in ds.train]
    fit_backbone_s, _ = backbone_pass(insp, train, batch)
    row["fit_backbone_s"] = fit_backbone_s
    row["n_train"] = len(train)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def main(argv: list[str] | None = None) -> int:
    from bench_quality import dataset_paths

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", help="folder of DATASET-MODEL.safetensors (bench_quality.py "
                   "--save-models)")
    p.add_argument("--quality", help="bench_quality.py --json file: its fit_s per pair")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--no-cli", action="store_true",
                   help="leave out the `flawscope predict` child-process runs")
    p.add_argument("--max-test", type=int, help="at most this many test images per dataset")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--worker", nargs=3, metavar=("MODEL_FILE", "DATASET", "PART"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    paths = dataset_paths()
    if args.worker:
        model_file, name, part = args.worker
        row = run_one(Path(model_file), paths[name], args.threads, args.max_test, part)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    fit_s = {}
    if args.quality:
        for r in json.loads(Path(args.quality).read_text()):
            if isinstance(r.get("fit_s"), float):
                fit_s[(r["dataset"], r["model"])] = r["fit_s"]
    rows = []
    for model_file in sorted(Path(args.models).glob("*.safetensors")):
        dataset, model = model_file.stem.rsplit("-", 1)
        if dataset not in paths:
            print(f"{model_file}: no dataset {dataset!r} found; skipped", file=sys.stderr)
            continue
        row = {"dataset": dataset, "model": model}
        cache = tempfile.mkdtemp()  # one export per model file, shared by its parts
        for part in ("main", *(() if args.no_cli else ("cli", "cli-torch"))):
            cmd = [sys.executable, __file__, args.models, "--worker", str(model_file), dataset,
                   part]
            for flag, value in (("--threads", args.threads), ("--max-test", args.max_test)):
                if value:
                    cmd += [flag, str(value)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "BENCH_CACHE": cache})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{model_file} {part} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row.update(json.loads(line[0][len("RESULT "):]))
        shutil.rmtree(cache, ignore_errors=True)
        if (dataset, model) in fit_s and "fit_backbone_s" in row:
            row["fit_s"] = fit_s[(dataset, model)]
            row["fit_ratio"] = row["fit_s"] / row["fit_backbone_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        write_json(args.json, rows)
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
