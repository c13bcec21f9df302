"""Images/s of PyTorch vs onnxruntime inference on CPU, batch 1 and batch 16.

Times the model itself on uint8 pixels already at the input size (decoding and resizing are
the same Python code on both paths and are left out). By default trains every registered
detector briefly on generated synthetic data (throughput does not depend on how well it is
trained); ``--model FILE`` benchmarks existing model files instead.

    python benchmarks/bench_export.py                      # every detector, 128 px
    python benchmarks/bench_export.py --model m.safetensors --batch 1 16 32
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import print_table, write_json

from flawscope.data.synthetic import generate_dataset
from flawscope.export import export_onnx
from flawscope.models import create, get_model_class, list_models
from flawscope.pipeline import Inspector
from flawscope.runtime import onnx_session
from flawscope.threshold import ScoreNormalization, Threshold


def quick_inspector(name: str, image_size: int, data: Path) -> Inspector:
    """``name`` fitted (one epoch where it trains) on 16 synthetic images, with a hand-set
    threshold."""
    opts = {"image_size": image_size, "epochs": 1, "device": "cpu", "progress": False}
    allowed = set(get_model_class(name).param_names())
    det = create(name, **{k: v for k, v in opts.items() if k in allowed})
    det.fit(sorted((data / "tile" / "train" / "good").glob("*.png"))[:16])
    return Inspector(det, Threshold(1.0, "manual"), ScoreNormalization(0.5, 1.0),
                     {"model": name})


def rate(fn, batch: int, seconds: float) -> float:
    """Images per second of ``fn()`` (one call = ``batch`` images), after a warm-up."""
    for _ in range(2):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 3:
            return n * batch / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", metavar="FILE", help="model file (repeatable)")
    ap.add_argument("--models", default=",".join(list_models()),
                    help="detectors to train if no --model (default: all)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=1.0, help="timing per measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            inspectors = [(m, Inspector.load(m, device="cpu")) for m in args.model]
        else:
            data = generate_dataset(tmp / "data", n_train=16, n_test_good=1,
                                    n_test_per_defect=1, image_size=args.image_size, seed=0)
            inspectors = [(n, quick_inspector(n, args.image_size, data))
                          for n in args.models.split(",")]
        for label, insp in inspectors:
            onnx_path, _ = export_onnx(insp, tmp / f"{insp.detector.model_name}.onnx")
            session = onnx_session(str(onnx_path), "cpu", args.threads)
            module = insp.detector.inference_module().cpu().eval()
            h, w = insp.input_size
            rng = np.random.default_rng(0)
            for b in args.batch:
                x = rng.integers(0, 256, (b, insp.channels, h, w), dtype=np.uint8)
                xt = torch.from_numpy(x)

                def run_torch(xt=xt, module=module):
                    with torch.inference_mode():
                        module(xt)

                def run_ort(x=x, session=session):
                    session.run(None, {"image": x})

                # interleaved repeats, median: the CPU may be shared with other work
                ts, os_ = [], []
                for _ in range(args.repeats):
                    ts.append(rate(run_torch, b, args.seconds))
                    os_.append(rate(run_ort, b, args.seconds))
                t, o = float(np.median(ts)), float(np.median(os_))
                rows.append({"model": str(label), "input": f"{h}x{w}x{insp.channels}",
                             "batch": b, "torch_img_s": round(t, 1), "ort_img_s": round(o, 1),
                             "ort_over_torch": round(o / t, 2)})

    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")
    print_table(rows, list(rows[0]))
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
