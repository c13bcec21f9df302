"""Where the time goes: fitted detectors at their defaults against the backbone alone.

For each model file ``DIR/DATASET-MODEL.safetensors`` (``bench_quality.py --save-models DIR``
fits them with the defaults, exactly as ``flawscope fit``), in its own process, on the test
images of the dataset:

- ``e2e img/s``: ``Inspector.predict`` on the image files (what ``flawscope predict`` runs:
  decode, resize, model, maps, regions), the headline divided by ``backbone img/s``: the
  backbone alone (forward to its deepest used stage) on the already decoded images, same
  input size, batch and threads. ``ratio`` = e2e / backbone (target >= 0.7).
- the split of one pass, per image (ms): decode + resize, backbone, patch embedding (pooling,
  upsampling, channel reduction), scorer (neighbour search / Mahalanobis), head (positional
  normalisation, smoothing, image score), regions (from the maps, in original pixels);
- ``onnx img/s``: the same folder through the exported graph in onnxruntime (``--onnx``);
- fit, from the model file's own timings (features, coreset, calibration) against one backbone
  pass (decode included) over the training images: ``fit / backbone`` (target <= 3);
- image and pixel AUROC of the same run and peak RSS of the process.

    python benchmarks/bench_quality.py --save-models /tmp/models --json q.json
    python benchmarks/bench_speed.py /tmp/models --quality q.json --threads 2 --json speed.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mb, print_table, write_json  # noqa: E402

COLUMNS = ["dataset", "model", "image_auroc", "pixel_auroc", "backbone_img_s", "e2e_img_s",
           "ratio", "onnx_img_s", "decode_ms", "backbone_ms", "embed_ms", "search_ms", "head_ms",
           "regions_ms", "fit_s", "fit_backbone_s", "fit_ratio", "peak_rss_mb"]


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


def run_one(model_path: Path, dataset_path: Path, threads: int | None, onnx: bool,
            max_test: int | None) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from flawscope.data.dataset import open_dataset
    from flawscope.data.images import read_mask
    from flawscope.data.source import iter_batches
    from flawscope.metrics import image_metrics, pixel_auroc
    from flawscope.pipeline import Inspector, make_predictions

    insp = Inspector.load(model_path, device="cpu")
    det = insp.detector
    ds = open_dataset(dataset_path)
    test = list(ds.test)
    if max_test and len(test) > max_test:  # every k-th image: goods and defects alike
        test = test[:: -(-len(test) // max_test)]
    paths = [s.path for s in test]
    labels = np.array([s.label for s in test])
    batch = det.batch_size
    n = len(paths)

    insp.predict(paths[: min(4, n)])  # warm-up: first-call allocations, lazy imports
    preds, e2e_s = _timed(lambda: insp.predict(paths, with_maps=True))
    scores = np.array([p.score for p in preds])
    row: dict = {"n_test": n, "threads": torch.get_num_threads(), "batch": batch,
                 "input_size": list(insp.input_size), "e2e_img_s": n / e2e_s}
    row["image_auroc"] = image_metrics(labels, scores, insp.threshold.value)["image_auroc"]
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
    row["fit_timings"] = getattr(det, "fit_timings_", {})
    train = [s.path for s in ds.train]
    fit_backbone_s, _ = backbone_pass(insp, train, batch)
    row["fit_backbone_s"] = fit_backbone_s
    row["n_train"] = len(train)
    if onnx:
        import tempfile

        from flawscope.export import export_onnx
        from flawscope.runtime import OnnxInspector

        with tempfile.TemporaryDirectory() as tmp:
            path, _ = export_onnx(insp, Path(tmp) / "m.onnx")
            ort = OnnxInspector(path, device="cpu")
            ort.predict(paths[: min(4, n)])
            ort_preds, ort_s = _timed(lambda: ort.predict(paths))
            row["onnx_img_s"] = n / ort_s
            row["onnx_max_score_dev"] = float(np.max(np.abs(
                np.array([p.score for p in ort_preds]) - scores)))
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def main(argv: list[str] | None = None) -> int:
    from bench_quality import dataset_paths

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", help="folder of DATASET-MODEL.safetensors (bench_quality.py "
                   "--save-models)")
    p.add_argument("--quality", help="bench_quality.py --json file: its fit_s per pair")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--onnx", action="store_true", help="also time the exported ONNX graph")
    p.add_argument("--max-test", type=int, help="at most this many test images per dataset")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--worker", nargs=2, metavar=("MODEL_FILE", "DATASET"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    paths = dataset_paths()
    if args.worker:
        model_file, name = args.worker
        row = run_one(Path(model_file), paths[name], args.threads, args.onnx, args.max_test)
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
        cmd = [sys.executable, __file__, args.models, "--worker", str(model_file), dataset]
        for flag, value in (("--threads", args.threads), ("--max-test", args.max_test)):
            if value:
                cmd += [flag, str(value)]
        if args.onnx:
            cmd.append("--onnx")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{model_file} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = {"dataset": dataset, "model": model, **json.loads(line[0][len("RESULT "):])}
        if (dataset, model) in fit_s:
            row["fit_s"] = fit_s[(dataset, model)]
            row["fit_ratio"] = row["fit_s"] / row["fit_backbone_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        write_json(args.json, rows)
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
