"""Nearest-neighbour search for PatchCore: flawscope's torch search vs faiss, on a real bank.

Fits PatchCore (default backbone and layers, 224 px, coreset ratio 0.1) on casting
``train/ok_front`` images, takes the patch features of test images as queries, and times
exact search with torch (chunked matrix products, what flawscope's inference module and its
ONNX export run), faiss ``IndexFlatL2`` (exact) and faiss HNSW (approximate), reporting the
largest relative error of the nearest distance against the exact answer.

    python benchmarks/bench_nn_search.py [--fit-images 200] [--queries 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import data_root, print_table, write_json

from flawscope.data import open_dataset
from flawscope.models import create
from flawscope.models.patchcore import augment_bank, nearest_distances


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit-images", type=int, default=200)
    ap.add_argument("--queries", type=int, default=32, help="test images whose patches query")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    ds = open_dataset(data_root() / "casting")
    det = create("patchcore", image_size=224, device="cpu", progress=False)
    det.fit(ds.train[: args.fit_images])
    bank = det.memory_bank_.float()
    module = det.inference_module()
    with torch.inference_mode():
        from flawscope.data.source import to_array

        x = torch.from_numpy(to_array(ds.test[: args.queries], det.input_size, det.channels_))
        emb = module.embedding(x)
    q = emb.flatten(2).transpose(1, 2).reshape(-1, emb.shape[1]).contiguous()
    center = bank.mean(0)
    bank_aug = augment_bank(bank, center)
    t_torch, exact = timed(lambda: nearest_distances(q - center, bank_aug))
    exact = exact.numpy()
    rows = [{"method": "torch exact (flawscope)", "seconds": t_torch, "max_rel_err": 0.0}]
    flat = faiss.IndexFlatL2(bank.shape[1])
    flat.add(bank.numpy())
    t_flat, (d_flat, _) = timed(lambda: flat.search(q.numpy(), 1))
    rows.append({"method": "faiss IndexFlatL2 (exact)", "seconds": t_flat,
                 "max_rel_err": float(np.max(np.abs(np.sqrt(d_flat[:, 0]) / exact - 1)))})
    for ef in (32, 128):
        hnsw = faiss.IndexHNSWFlat(bank.shape[1], 32)
        t0 = time.perf_counter()
        hnsw.add(bank.numpy())
        build = time.perf_counter() - t0
        hnsw.hnsw.efSearch = ef
        t_h, (d_h, _) = timed(lambda h=hnsw: h.search(q.numpy(), 1))
        rows.append({"method": f"faiss HNSW32 ef={ef} (build {build:.1f} s)", "seconds": t_h,
                     "max_rel_err": float(np.max(np.sqrt(d_h[:, 0]) / exact - 1))})
    for r in rows:
        r["queries_per_s"] = round(len(q) / r["seconds"])
        r["seconds"] = round(r["seconds"], 3)
    print(f"bank {tuple(bank.shape)}, {len(q)} query patches from {args.queries} test images, "
          f"{args.threads} threads")
    print_table(rows, ["method", "seconds", "queries_per_s", "max_rel_err"])
    write_json(args.json, {"args": vars(args), "bank": list(bank.shape), "rows": rows})


if __name__ == "__main__":
    main()
