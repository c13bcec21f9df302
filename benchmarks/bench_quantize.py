"""int8: what onnxruntime's quantisation of the exported graph costs and gains (issue 27).

For each model file ``DATASET-MODEL.safetensors`` given: the exported graph (float32, what
``--runtime auto`` runs) and its dynamically quantised copies (``onnxruntime.quantization.
quantize_dynamic``, int8 weights: every supported op, and only the matrix products), on the
dataset's test split: images/s through :class:`~flawscope.runtime.OnnxInspector`, image AUROC,
pixel AUROC and the largest score deviation from float32; file size. Nothing here is a
default: a row shows what ``int8`` would cost.

    python benchmarks/bench_quantize.py /tmp/models/pill-patchcore.safetensors --json q8.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_json

COLUMNS = ["dataset", "model", "variant", "img_s", "image_auroc", "pixel_auroc",
           "max_score_dev", "mb"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--json")
    args = p.parse_args()
    import numpy as np
    from bench_quality import dataset_paths
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from flawscope.data.dataset import open_dataset
    from flawscope.data.images import read_mask
    from flawscope.export import export_onnx
    from flawscope.metrics import image_metrics, pixel_auroc
    from flawscope.runtime import ONNX_FORMAT, OnnxInspector

    paths = dataset_paths()
    rows = []
    work = Path(tempfile.mkdtemp())
    for model in map(Path, args.models):
        dataset, name = model.stem.rsplit("-", 1)
        test = list(open_dataset(paths[dataset]).test)
        if args.max_test and len(test) > args.max_test:
            test = test[:: -(-len(test) // args.max_test)]
        files = [s.path for s in test]
        labels = np.array([s.label for s in test])
        fp32, _ = export_onnx(model, work / f"{model.stem}.onnx")
        variants = {"float32": fp32}
        for label, ops in (("int8 (all ops)", None), ("int8 (MatMul)", ["MatMul"])):
            out = work / f"{model.stem}-{len(variants)}.onnx"
            try:
                quantize_dynamic(fp32, out, weight_type=QuantType.QInt8,
                                 op_types_to_quantize=ops)
            except Exception as exc:  # the quantiser's failures come in many types
                print(f"{model.name} {label}: quantisation failed: {exc}", file=sys.stderr)
                continue
            variants[label] = out
        ref = None
        masks = None
        for label, path in variants.items():
            import onnx

            proto = onnx.load(str(path))  # quantize_dynamic keeps the metadata; check it
            meta = {m.key: m.value for m in proto.metadata_props}
            if meta.get("flawscope_format") != ONNX_FORMAT:
                print(f"{path}: metadata lost in quantisation", file=sys.stderr)
                continue
            insp = OnnxInspector(path, device="cpu")
            insp.predict(files[:4])
            t0 = time.perf_counter()
            preds = insp.predict(files, with_maps=True)
            seconds = time.perf_counter() - t0
            scores = np.array([q.score for q in preds])
            if ref is None:
                ref = scores
            row = {"dataset": dataset, "model": name, "variant": label,
                   "img_s": len(files) / seconds,
                   "image_auroc": image_metrics(labels, scores, 0.0)["image_auroc"],
                   "max_score_dev": float(np.max(np.abs(scores - ref))),
                   "mb": os.path.getsize(path) / 2**20}
            if any(s.mask_path is not None for s in test):
                if masks is None:
                    masks = np.stack([read_mask(s.mask_path, insp.input_size) for s in test])
                row["pixel_auroc"] = pixel_auroc(masks, np.stack([q.anomaly_map
                                                                  for q in preds]))
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
            write_json(args.json, rows)
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
