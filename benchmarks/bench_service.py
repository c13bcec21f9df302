"""The service against issue 27's targets: latency of one image, throughput under 16 clients.

For each model file ``DATASET-MODEL.safetensors`` given, ``flawscope serve MODEL --db off`` in
a child process (every core, the default runtime and ``--runtime torch``) on the dataset's
test images (``$FLAWSCOPE_DATA``), one image per request as a line camera sends them:

- ``p50 ms`` / ``p95 ms``: latency of ``--requests`` sequential requests (one client), against
  ``backbone ms``: the backbone alone on one decoded image at batch 1, PyTorch, same threads
  (target: p50 <= 1.5x);
- ``16 clients img/s``: images answered per second with 16 concurrent clients (the station
  benchmark's load generator) for
  ``--seconds``, against ``predict img/s``: ``Inspector.predict`` on the same images as one
  folder at the same runtime (target: >= 1x).

Each runtime runs at every ``--micro-batches`` value (``serve --micro-batch``: most images of
concurrent requests scored in one call; 1 = each request alone, as before micro-batching).

    python benchmarks/bench_service.py /tmp/models/pill-patchcore.safetensors --json svc.json
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, print_table, write_json

sys.path.insert(0, str(REPO / "tests"))  # the station tests' server helper

import httpx  # noqa: E402
from bench_station import _window  # noqa: E402 - the station's load generator

from station_support import Server  # noqa: E402

COLUMNS = ["dataset", "model", "runtime", "micro_batch", "backbone_ms", "p50_ms", "p95_ms",
           "p50_ratio", "clients_img_s", "predict_img_s", "throughput_ratio"]


def _mime(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def backbone_ms(model: Path, image: str) -> float:
    """Median ms of the backbone alone on one decoded image (batch 1), PyTorch."""
    import torch
    from bench_speed import _backbone_seconds, _parts

    from flawscope.data.source import iter_batches
    from flawscope.pipeline import Inspector

    insp = Inspector.load(model, device="cpu")
    embeddings, _ = _parts(insp.detector.inference_module())
    x = torch.from_numpy(next(iter_batches([image], insp.input_size, insp.channels, 1))[0])
    with torch.inference_mode():
        times = [sum(_backbone_seconds(e, x) for e in embeddings) for _ in range(12)]
    return 1000 * statistics.median(times[2:])


def predict_img_s(model: Path, paths: list[str], runtime: str) -> float:
    from flawscope.runtime import load_any_model

    insp = load_any_model(model, device="cpu", runtime=runtime)
    insp.predict(paths[:4])
    t0 = time.perf_counter()
    insp.predict(paths)
    return len(paths) / (time.perf_counter() - t0)


def latencies(base: str, files: list[tuple[str, bytes]], n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=base, timeout=120) as http:
        for i in range(n + 3):
            name, data = files[i % len(files)]
            t0 = time.perf_counter()
            r = http.post("/v1/predict?heatmap=false", files=[("files", (name, data, _mime(name)))])
            r.raise_for_status()
            if i >= 3:  # the first requests warm the service up
                out.append(1000 * (time.perf_counter() - t0))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="DATASET-MODEL.safetensors files")
    p.add_argument("--runtimes", nargs="+", default=["auto", "torch"])
    p.add_argument("--micro-batches", nargs="+", type=int, default=[8, 1])
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--json")
    args = p.parse_args()
    from bench_quality import dataset_paths

    from flawscope.data.dataset import open_dataset
    from flawscope.fastruntime import select_runtime
    from flawscope.pipeline import Inspector

    os.environ.setdefault("FLAWSCOPE_CACHE", tempfile.mkdtemp())
    threads = str(os.cpu_count() or 1)
    paths = dataset_paths()
    rows = []
    for model in map(Path, args.models):
        dataset, name = model.stem.rsplit("-", 1)
        test = [s.path for s in open_dataset(paths[dataset]).test]
        files = [(Path(t).name, Path(t).read_bytes()) for t in test[:64]]
        bb = backbone_ms(model, test[0])
        # the graph `flawscope fit` leaves in the cache
        select_runtime(Inspector.load(model, device="cpu"), model, "auto", prepare_missing=True)
        for runtime in args.runtimes:
            folder = predict_img_s(model, test[:64], runtime)
            for micro in args.micro_batches:
                log(f"{model.name}: serve --runtime {runtime} --micro-batch {micro} ...")
                srv = Server(model, "--db", "off", "--runtime", runtime, "--micro-batch",
                             str(micro), env={"OMP_NUM_THREADS": threads}).wait_ready(300)
                try:
                    lat = latencies(srv.base, files, args.requests)
                    tput = _window(srv, files, args.clients, args.seconds)[0]
                finally:
                    srv.proc.terminate()
                    srv.proc.wait(60)
                p50 = statistics.median(lat)
                rows.append({"dataset": dataset, "model": name, "runtime": runtime,
                             "micro_batch": micro, "backbone_ms": bb, "p50_ms": p50,
                             "p95_ms": statistics.quantiles(lat, n=20)[18],
                             "p50_ratio": p50 / bb, "clients_img_s": tput,
                             "predict_img_s": folder, "throughput_ratio": tput / folder})
                log(str(rows[-1]))
                write_json(args.json, rows)
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
