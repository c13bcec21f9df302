"""One benchmark run in its own process: fit one library's model, score images, report.

Run by ``bench_anomalib.py`` (never by hand), with the flawscope venv for ``flawscope`` jobs
and the separate anomalib venv for ``anomalib`` jobs, so peak RSS (``ru_maxrss``) is one
library's alone. Reads a JSON job, writes ``<out>.npz`` (scores, optional float16 maps) and
prints one JSON line of timings. Does not import flawscope in anomalib jobs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import peak_rss_mb


def backbone_rate(forward, batch: int, size: int, repeats: int = 3) -> float:
    """Images per second of ``forward`` on a normalised random ``batch x 3 x size x size``."""
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        forward(x)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            forward(x)
            best = min(best, time.perf_counter() - t)
    return batch / best


# ---------------------------------------------------------------------- flawscope
def run_flawscope(job: dict) -> dict:
    from flawscope.backbones import FeatureExtractor
    from flawscope.models import create

    opts = {
        "image_size": job["image_size"], "backbone": job["backbone"], "layers": job["layers"],
        "batch_size": job["batch_size"], "device": "cpu", "seed": job["seed"],
        "progress": False,
    }
    if job["model"] == "patchcore":
        opts.update(coreset_ratio=job["coreset_ratio"], num_neighbors=job["num_neighbors"])
        if job.get("chunk_size"):
            opts["chunk_size"] = job["chunk_size"]
    else:
        opts["n_features"] = job["n_features"]
    if job["library"] == "flawscope-bf16":
        opts["precision"] = "bf16"
    if job.get("flawscope_defaults"):  # flawscope's own defaults, the backbone only shared
        opts = {"backbone": job["backbone"], "device": "cpu", "seed": job["seed"],
                "progress": False}
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    det = create(job["model"], **opts).fit(job["fit"])
    fit_s = time.perf_counter() - t0
    rss_fit = peak_rss_mb()
    t1 = time.perf_counter()
    scores, maps = det.score(job["score"], with_maps=True)
    infer_s = time.perf_counter() - t1
    rss_end = peak_rss_mb()
    if tuple(det.input_size) != (job["image_size"],) * 2:  # maps compared at the job's size
        maps = torch.nn.functional.interpolate(
            torch.from_numpy(maps)[:, None], size=(job["image_size"],) * 2, mode="bilinear",
            align_corners=False)[:, 0].numpy()
    size, bs = job["image_size"], job["batch_size"]
    plain = FeatureExtractor(job["backbone"], job["layers"], device="cpu")  # timm as is
    emb = det.inference_module().embedding
    extra = {
        "backbone_raw_ips": backbone_rate(plain, bs, size),
        "backbone_flawscope_ips": backbone_rate(
            lambda x: emb.extractor(x.contiguous(memory_format=torch.channels_last)), bs, size),
        "weights": det.describe()["weights"],
        "bank": int(det.memory_bank_.shape[0]) if job["model"] == "patchcore" else None,
        "input_size": list(det.input_size),
    }
    if job.get("flawscope_defaults"):
        from flawscope.threshold import calibrate_good_quantile

        extra["threshold"] = calibrate_good_quantile(det.calibration_scores_, 0.01).value
    return _result(job, scores, maps, fit_s, infer_s, rss0, rss_fit, rss_end, extra)


# ---------------------------------------------------------------------- anomalib
def run_anomalib(job: dict) -> dict:
    from anomalib.data.utils import read_image
    from anomalib.pre_processing import PreProcessor
    from safetensors.torch import load_file
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    size, bs = job["image_size"], job["batch_size"]
    transform = Compose([
        Resize((size, size), antialias=True),
        Normalize(mean=job["mean"], std=job["std"]),
    ])
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    common = {
        "backbone": job["backbone"], "layers": list(job["layer_names"]), "pre_trained": False,
        "pre_processor": PreProcessor(transform=transform), "post_processor": False,
        "evaluator": False, "visualizer": False,
    }
    torch.manual_seed(job["seed"])
    if job["model"] == "patchcore":
        from anomalib.models import Patchcore

        model = Patchcore(coreset_sampling_ratio=job["coreset_ratio"],
                          num_neighbors=job["num_neighbors"], **common)
    else:
        from anomalib.models import Padim

        model = Padim(n_features=job["n_features"], **common)
        # the same random channel subset as flawscope's PaDiM, so both model the same features
        model.model.idx = torch.tensor(job["padim_channels"], dtype=torch.long)
    extractor = model.model.feature_extractor
    # the same ImageNet weights flawscope uses (converted to timm naming by the parent)
    state = load_file(job["weights_file"])
    target = extractor.feature_extractor
    result = target.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise SystemExit(f"anomalib backbone: weights missing {result.missing_keys[:5]}")
    check = _check_features(extractor, job)

    def batches(paths):
        for i in range(0, len(paths), bs):
            imgs = [transform(read_image(p, as_tensor=True)) for p in paths[i : i + bs]]
            yield torch.stack(imgs)

    model.model.train()  # what Lightning's training_step does, batch by batch
    with torch.no_grad():
        for x in batches(job["fit"]):
            model.model(x)
    model.fit()  # coreset (PatchCore) / Gaussians (PaDiM)
    fit_s = time.perf_counter() - t0
    rss_fit = peak_rss_mb()
    model.model.eval()
    t1 = time.perf_counter()
    scores, maps = [], []
    with torch.inference_mode():
        for x in batches(job["score"]):
            out = model.model(x)
            scores.append(out.pred_score.reshape(-1).float().numpy())
            maps.append(out.anomaly_map.reshape(len(x), size, size).float().numpy())
    infer_s = time.perf_counter() - t1
    rss_end = peak_rss_mb()
    extra = {
        "backbone_anomalib_ips": backbone_rate(extractor, bs, size),
        "feature_check_max_abs_diff": check,
        "bank": int(model.model.memory_bank.shape[0]) if job["model"] == "patchcore" else None,
    }
    return _result(job, np.concatenate(scores), np.concatenate(maps), fit_s, infer_s, rss0,
                   rss_fit, rss_end, extra)


def _check_features(extractor, job: dict) -> float:
    """Max abs difference between anomalib's features and flawscope's on the same input."""
    x = torch.from_numpy(np.load(job["check"]["input"]))
    with torch.inference_mode():
        feats = list(extractor(x).values())
    ref = [np.load(p) for p in job["check"]["features"]]
    if [tuple(f.shape) for f in feats] != [r.shape for r in ref]:
        raise SystemExit(f"feature shapes differ: {[tuple(f.shape) for f in feats]} vs "
                         f"{[r.shape for r in ref]}")
    return max(float(np.abs(f.numpy() - r).max()) for f, r in zip(feats, ref))


# ---------------------------------------------------------------------- common
def _result(job, scores, maps, fit_s, infer_s, rss0, rss_fit, rss_end, extra) -> dict:
    out = Path(job["out"])
    arrays = {"scores": np.asarray(scores, np.float32)}
    if job.get("keep_maps"):
        arrays["maps"] = np.asarray(maps, np.float16)
    np.savez(out, **arrays)
    n_fit, n_score = len(job["fit"]), len(job["score"])
    return {
        "library": job["library"], "model": job["model"], "dataset": job["dataset"],
        "n_fit": n_fit, "n_score": n_score,
        "fit_s": fit_s, "infer_s": infer_s, "infer_ips": n_score / infer_s,
        "rss_start_mb": rss0, "rss_fit_mb": rss_fit, "rss_peak_mb": rss_end,
        "threads": torch.get_num_threads(), **extra,
    }


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job["threads"]))
    run = run_anomalib if job["library"] == "anomalib" else run_flawscope
    print("RESULT " + json.dumps(run(job)), flush=True)


if __name__ == "__main__":
    main()
