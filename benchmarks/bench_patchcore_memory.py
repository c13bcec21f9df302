"""Peak memory of PatchCore's fit for N and 4N training images: streaming vs one-shot coreset.

Each fit runs in a fresh subprocess and reports its peak resident set size (``ru_maxrss``),
its RSS before fitting (interpreter, torch, flawscope), the fit time and the memory-bank size.

* ``streaming`` (the default fit): features are extracted batch by batch into a chunk buffer
  of ``--chunk-size`` patches, each full chunk is reduced by the greedy coreset on its own, so
  memory grows only by the bank (``coreset_ratio`` of the patches);
* ``one-shot``: ``chunk_size`` larger than all patches, i.e. all patch features and their
  random projection held at once, as in the paper's reference code and anomalib.

Images: casting ``train/ok_front`` under ``$FLAWSCOPE_DATA`` (default ``../shared/data``), or
``--images DIR``; 4N must not exceed the images available.

    python benchmarks/bench_patchcore_memory.py --n 100
    python benchmarks/bench_patchcore_memory.py --n 50 --image-size 128 --modes streaming
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO as ROOT
from common import peak_rss_mb

DATA = Path(os.environ.get("FLAWSCOPE_DATA", ROOT.parent / "shared" / "data"))


def child(args: argparse.Namespace) -> None:
    import torch

    from flawscope.models import create

    torch.set_num_threads(args.threads)
    paths = json.loads(Path(args.paths_file).read_text())[: args.count]
    rss0 = peak_rss_mb()
    chunk = args.chunk_size if args.mode == "streaming" else 1 << 40
    t0 = time.perf_counter()
    det = create("patchcore", image_size=args.image_size, coreset_ratio=args.coreset_ratio,
                 chunk_size=chunk, batch_size=args.batch_size, device="cpu",
                 progress=False).fit(paths)
    print("RESULT " + json.dumps({
        "mode": args.mode, "images": len(paths), "patches": det.n_train_patches_,
        "bank": int(det.memory_bank_.shape[0]), "dim": det.feature_dim_,
        "fit_s": time.perf_counter() - t0, "rss_before_fit_mb": rss0,
        "rss_peak_mb": peak_rss_mb(),
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="N: runs use N and 4N images")
    ap.add_argument("--images", type=Path, default=DATA / "casting" / "train" / "ok_front")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--coreset-ratio", type=float, default=0.01,
                    help="small by default so the one-shot coreset of 4N stays quick")
    ap.add_argument("--chunk-size", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--modes", default="streaming,one-shot")
    ap.add_argument("--threads", type=int, default=2)
    # internal: one measurement in a child process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--paths-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from flawscope.data.images import IMAGE_SUFFIXES

    if not args.images.is_dir():
        raise SystemExit(f"{args.images}: no such folder (set FLAWSCOPE_DATA or --images)")
    paths = sorted(str(p) for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 4 * args.n:
        raise SystemExit(f"{args.images}: {len(paths)} images, 4N = {4 * args.n} needed")
    out = ROOT / ".bench" / "memory"
    out.mkdir(parents=True, exist_ok=True)
    paths_file = out / "paths.json"
    paths_file.write_text(json.dumps(paths[: 4 * args.n]))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}
    rows = []
    for mode in args.modes.split(","):
        for count in (args.n, 4 * args.n):
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--count", str(count),
                   "--paths-file", str(paths_file), "--image-size", str(args.image_size),
                   "--coreset-ratio", str(args.coreset_ratio), "--chunk-size",
                   str(args.chunk_size), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"{mode} x {count} failed:\n{proc.stderr[-2000:]}")
            row = json.loads(line[-1][7:])
            rows.append(row)
            print(f"{mode:9s} {count:5d} images: peak RSS {row['rss_peak_mb']:.0f} MB "
                  f"(+{row['rss_peak_mb'] - row['rss_before_fit_mb']:.0f} MB over "
                  f"{row['rss_before_fit_mb']:.0f} MB before fit), bank {row['bank']}, "
                  f"fit {row['fit_s']:.1f} s", file=sys.stderr, flush=True)
    dim = rows[0]["dim"]
    print("\n| mode | images | patches | bank | fit s | peak RSS MB | RSS growth in fit MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['images']} | {r['patches']} | {r['bank']} | {r['fit_s']:.1f} "
              f"| {r['rss_peak_mb']:.0f} | {r['rss_peak_mb'] - r['rss_before_fit_mb']:.0f} |")
    proj = 128 if dim >= 2 * 128 else dim  # PatchCore's default projection_dims rule
    chunk_mb = 4 * (args.chunk_size * (dim + proj + 3)) / 2**20
    print(f"\nstated streaming bound beyond one batch's backbone activations and the bank: "
          f"4 B x {args.chunk_size} x ({dim} + {proj} + 3) = {chunk_mb:.0f} MB")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
