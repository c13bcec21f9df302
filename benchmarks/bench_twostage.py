"""Two-stage inspection on MVTec: defect types named on the parts the detector rejects.

Per category (default bottle, pill, metal_nut): the detector (``flawscope fit DATA``, PatchCore
defaults) scores the category's ``type-eval`` defects (the 30 % of each defect type a type
classifier never trains on, :mod:`flawscope.twostage`) and its good test images; a type
classifier (``flawscope classify fit CATEGORIES --defects-only``, trained on the ``type-train``
parts (70 %) of all categories together: 2 folds, 192 px, the epochs ``--defects-only`` picks
for at least 256 optimizer steps) names the type of every rejected part. Reported per category
and input (``image``: the whole image, ``region``: a crop around the detector's strongest
region, ``image+region``: the mean of both models' probabilities, as ``predict --classifier
IMAGE_MODEL --classifier REGION_MODEL`` gives it): evaluation defects, rejected defects, type
accuracy on the rejected defects, good parts rejected; with ``--json`` also the confusion
tables.

Detector and classifier files are made once (missing ones are fitted, niced and with the
given threads, through the CLI with its defaults) and reused::

    PYTHONPATH=src python benchmarks/bench_twostage.py --models /work/runs/classify/twostage \\
        --threads 1 [--json results.json]

Data: ``$FLAWSCOPE_DATA/mvtec_ad`` (or ``--data``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import data_root, print_table, write_json  # noqa: E402

from flawscope.cli import main as cli  # noqa: E402
from flawscope.twostage import (  # noqa: E402
    INPUTS,
    TypeEvaluation,
    defect_samples,
    load_type_classifier,
    name_defects,
    split_defects,
)

#: the type classifiers' budget: 2 folds, 192 px, the epochs --defects-only picks (at least 256
#: optimizer steps)
BUDGET = ["--folds", "2", "--image-size", "192"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="MVTec root (default $FLAWSCOPE_DATA/mvtec_ad)")
    p.add_argument("--categories", default="bottle,pill,metal_nut")
    p.add_argument("--inputs", default="image,region", help="type classifiers to compare")
    p.add_argument("--models", type=Path, required=True,
                   help="folder of the detector (<category>.safetensors) and type classifier "
                   "(types-<input>.safetensors) files: made when missing, else reused")
    p.add_argument("--seed", type=int, help="type classifiers' seed (default: the CLI's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def ensure_detector(root: Path, path: Path) -> None:
    if path.is_file():
        return
    print(f"fitting the detector: flawscope fit {root} -o {path}", file=sys.stderr)
    if cli(["fit", str(root), "-o", str(path), "--quiet"]) != 0:
        sys.exit(f"fitting {path} failed")


def ensure_types(roots: list[Path], input: str, path: Path, args: argparse.Namespace) -> None:
    if path.is_file():
        return
    cmd = ["classify", "fit", *map(str, roots), "--defects-only", "--input", input, "-o",
           str(path), *BUDGET, "--threads", str(args.threads), "--quiet"]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    print("fitting the type classifier: flawscope " + " ".join(cmd), file=sys.stderr)
    if cli(cmd) != 0:
        sys.exit(f"fitting {path} failed")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from flawscope.runtime import load_any_model

    torch.set_num_threads(args.threads)
    root = args.data or data_root() / "mvtec_ad"
    cats = [c.strip() for c in args.categories.split(",") if c.strip()]
    inputs = [i.strip() for i in args.inputs.split(",") if i.strip()]
    bad = [i for i in inputs if i not in INPUTS]
    if bad:
        sys.exit(f"--inputs {','.join(bad)}: choose from {', '.join(INPUTS)}")
    args.models.mkdir(parents=True, exist_ok=True)
    roots = [root / c for c in cats]
    for c, r in zip(cats, roots):
        ensure_detector(r, args.models / f"{c}.safetensors")
    classifiers = {}
    for i in inputs:
        ensure_types(roots, i, args.models / f"types-{i}.safetensors", args)
        classifiers[i] = load_type_classifier(args.models / f"types-{i}.safetensors", "cpu")
    variants = list(inputs) + (["image+region"] if {"image", "region"} <= set(inputs) else [])
    rows, details = [], {}
    for c, r in zip(cats, roots):
        detector = load_any_model(args.models / f"{c}.safetensors", device="cpu")
        fraction = float(next(iter(classifiers.values())).config["two_stage"]
                         ["type_train_fraction"])
        samples = defect_samples([r])
        _, evaluate = split_defects(samples, fraction)
        chosen = [*evaluate, *[s for s in samples if not s.is_defect and s.split == "test"]]
        t0 = time.perf_counter()
        preds = detector.predict([s.path for s in chosen])
        detect_s = time.perf_counter() - t0
        named: dict[str, list[dict[str, Any] | None]] = {}
        seconds: dict[str, float] = {}
        for i, clf in classifiers.items():
            t0 = time.perf_counter()
            named[i] = name_defects(clf, preds, [s.path for s in chosen], probabilities=True)
            seconds[i] = time.perf_counter() - t0
        if "image+region" in variants:  # both models averaged (predict --classifier A -c B)
            t0 = time.perf_counter()
            named["image+region"] = name_defects(
                [classifiers["image"], classifiers["region"]], preds, [s.path for s in chosen])
            seconds["image+region"] = time.perf_counter() - t0
        types = sorted({s.state_label for s in evaluate})
        for v in variants:
            ev = TypeEvaluation([
                {"path": str(s.path), "true": s.state_label if s.is_defect else "good",
                 "score": float(p.score), "verdict": p.verdict,
                 "named": None if n is None else n["label"],
                 "probability": None if n is None else n["probability"],
                 "input": None if n is None else n["input"]}
                for s, p, n in zip(chosen, preds, named[v])], types)
            m = ev.metrics
            n_rej = max(m["rejected_defects"], 1)
            rows.append({"category": c, "input": v, "eval defects": m["defects"],
                         "rejected": m["rejected_defects"],
                         "type accuracy": m["type_accuracy"],
                         "named right": m["named_right"],
                         "good rejected": f"{m['false_rejects']}/{m['good']}",
                         "type ms/part": 1000 * seconds[v] / n_rej})
            details[f"{c}/{v}"] = m
        details[f"{c}/detector_seconds"] = detect_s
    for v in variants:  # all three categories together
        ms = [details[f"{c}/{v}"] for c in cats]
        rej = sum(m["rejected_defects"] for m in ms)
        right = sum(m["named_right"] for m in ms)
        rows.append({"category": "all", "input": v,
                     "eval defects": sum(m["defects"] for m in ms), "rejected": rej,
                     "type accuracy": right / rej if rej else float("nan"),
                     "named right": right,
                     "good rejected": f"{sum(m['false_rejects'] for m in ms)}/"
                                      f"{sum(m['good'] for m in ms)}"})
    oof = {i: (c.config.get("oof") or {}).get("macro_f1") for i, c in classifiers.items()}
    return {"rows": rows, "details": details, "type_classifier_oof_macro_f1": oof,
            "models": str(args.models), "threads": args.threads}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    result = run(args)
    print_table(result["rows"], ["category", "input", "eval defects", "rejected",
                                 "type accuracy", "named right", "good rejected",
                                 "type ms/part"])
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
