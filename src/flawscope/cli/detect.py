"""``flawscope fit | predict | evaluate | demo``: anomaly detection from good parts."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flawscope.cli.common import parse_params, print_json, print_table
from flawscope.data.dataset import READERS, open_dataset
from flawscope.data.images import expand_images
from flawscope.errors import ConfigError
from flawscope.models import list_models
from flawscope.models.registry import check_options
from flawscope.pipeline import DEFAULT_MODEL, THRESHOLD_RULES, Inspector


def add_commands(sub: argparse._SubParsersAction) -> None:
    fit = sub.add_parser(
        "fit", help="train a detector on good images and calibrate its threshold",
        description="Train an anomaly detector on the good training images of DATA, "
        "calibrate the OK/defect threshold on held-out good images, and save one model file.",
    )
    fit.add_argument("data", metavar="DATA", help="dataset folder (layout auto-detected)")
    fit.add_argument("--model", default=DEFAULT_MODEL, choices=list_models(),
                     help="detector (default: %(default)s)")
    fit.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write")
    fit.add_argument("--format", default="auto", choices=["auto", *READERS],
                     help="dataset layout (default: detect)")
    fit.add_argument("--image-size", type=int,
                     help="model input size: SIZE x SIZE, or for patchcore, padim and "
                     "patchcore-ensemble about SIZE^2 pixels at the photos' aspect ratio")
    fit.add_argument("--epochs", type=int, help="training epochs (autoencoders)")
    fit.add_argument("--score", dest="score_rule",
                     help="image score rule (autoencoders): a residual statistic, map-max or "
                     "learned")
    fit.add_argument("--backbone", metavar="NAME",
                     help="timm backbone (patchcore, padim; default tf_efficientnet_lite0)")
    fit.add_argument("--weights", metavar="FILE|random",
                     help="backbone weights: a .safetensors/.pth file, or 'random' (patchcore, "
                     "padim; default: ImageNet weights from the installed package)")
    fit.add_argument("--coreset-ratio", type=float, metavar="R",
                     help="share of training patches kept in the memory bank (patchcore; "
                     "default 0.1)")
    fit.add_argument("--tile", dest="tile_input_size", type=int, metavar="SIZE",
                     help="load images at SIZE and score them as overlapping tiles of the image "
                     "size, for small defects in large images (patchcore, padim)")
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    fit.add_argument("--batch-size", type=int)
    fit.add_argument("--seed", type=int)
    fit.add_argument("--max-frr", type=float, default=0.01,
                     help="largest share of good parts to reject (default 0.01)")
    fit.add_argument("--threshold-rule", default="good-quantile", choices=THRESHOLD_RULES)
    fit.add_argument("--defects", metavar="DIR", nargs="+",
                     help="labelled defect images (files or folders) for learned scores and the "
                     "f1-optimal threshold")
    fit.add_argument("--param", action="append", metavar="KEY=VALUE",
                     help="any other model option, JSON value (repeatable)")
    fit.add_argument("--skip-bad", action="store_true",
                     help="leave out unreadable images (listed on stderr) instead of stopping")
    fit.add_argument("--resume", action="store_true",
                     help="continue an interrupted training run from MODEL.ckpt")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.set_defaults(func=cmd_fit)

    pred = sub.add_parser("predict", help="score images: score, verdict, threshold per image")
    pred.add_argument("model", metavar="MODEL")
    pred.add_argument("images", metavar="IMAGE_OR_DIR", nargs="+")
    pred.add_argument("--json", action="store_true", help="print one JSON list")
    pred.add_argument("--skip-bad", action="store_true",
                      help="skip unreadable images (listed on stderr) instead of stopping")
    pred.add_argument("--device", default="auto")
    pred.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="metrics of a model on the test split of a dataset")
    ev.add_argument("model", metavar="MODEL")
    ev.add_argument("data", metavar="DATA")
    ev.add_argument("--format", default="auto", choices=["auto", *READERS])
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--report", metavar="DIR", help="write an HTML report to DIR")
    ev.add_argument("--skip-bad", action="store_true",
                    help="leave out unreadable images (listed on stderr) instead of stopping")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_evaluate)

    cal = sub.add_parser(
        "calibrate", help="re-calibrate a model's threshold on held-out images",
        description="Set MODEL's threshold from good images it was not fitted on (and labelled "
        "defects for the f1-optimal rule), e.g. after a change on the line; writes a new model.",
    )
    cal.add_argument("model", metavar="MODEL")
    cal.add_argument("good", metavar="GOOD_IMAGE_OR_DIR", nargs="+")
    cal.add_argument("-o", "--output", required=True, metavar="NEW_MODEL")
    cal.add_argument("--defects", metavar="IMAGE_OR_DIR", nargs="+")
    cal.add_argument("--max-frr", type=float, default=0.01)
    cal.add_argument("--threshold-rule", default="good-quantile", choices=THRESHOLD_RULES)
    cal.add_argument("--device", default="auto")
    cal.set_defaults(func=cmd_calibrate)

    demo = sub.add_parser("demo", help="generate data, fit, evaluate and write a report")
    demo.add_argument("-o", "--output", default="flawscope-demo", metavar="DIR")
    demo.add_argument("--models", default="ncae,patchcore", help="comma-separated detectors")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)


def _model_options(args: argparse.Namespace) -> dict:
    opts = parse_params(args.param)
    for name in ("image_size", "epochs", "score_rule", "batch_size", "seed", "backbone",
                 "weights", "coreset_ratio", "tile_input_size"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    opts["device"] = args.device
    if args.quiet:
        opts["progress"] = False
    return opts


def _open(args: argparse.Namespace):
    """``args.data`` as a dataset; ``--skip-bad`` lists unreadable files and leaves them out."""
    dataset = open_dataset(args.data, args.format)
    if args.skip_bad:
        dataset = dataset.without_unreadable()
        for _, reason in dataset.skipped:
            print(f"skipped: {reason}", file=sys.stderr)
    return dataset


def cmd_fit(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.is_dir():
        raise ConfigError(f"-o {out}: is a folder; give a model file name")
    options = _model_options(args)
    check_options(args.model, options)
    dataset = _open(args)
    defects = expand_images(args.defects) if args.defects else None
    ckpt = out.with_name(out.name + ".ckpt")
    if ckpt.exists() and not args.resume:
        print(f"note: {ckpt} from an interrupted run exists; pass --resume to continue it. "
              "Starting fresh.", file=sys.stderr)
    elif args.resume and ckpt.exists():
        print(f"resuming from {ckpt}", file=sys.stderr)
    n_train = len(dataset.train)
    print(f"{dataset.root}: {dataset.format} layout, {n_train} good training images, "
          f"{len(dataset.test)} test images", file=sys.stderr)
    inspector = Inspector.train(
        dataset, args.model, max_frr=args.max_frr, threshold_rule=args.threshold_rule,
        defects=defects, checkpoint=ckpt, resume=args.resume, **options,
    )
    inspector.save(out)
    ckpt.unlink(missing_ok=True)
    split = inspector.info["split"]
    h, w = inspector.input_size
    print(f"{args.model}: learned from {split['fit']} good images at {h}x{w} px; threshold "
          f"scores: {split['calibration_method']} ({split['calibration']})", file=sys.stderr)
    print(inspector.threshold.describe(), file=sys.stderr)
    print(f"model written to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from flawscope.export import load_any_model  # a model file or an exported .onnx

    inspector = load_any_model(args.model, device=args.device)
    paths = expand_images(args.images)
    if args.skip_bad:
        from flawscope.data.images import read_image
        from flawscope.errors import ImageReadError

        good = []
        for p in paths:
            try:
                read_image(p)
                good.append(p)
            except ImageReadError as exc:
                print(f"skipped: {exc}", file=sys.stderr)
        paths = good
    preds = inspector.predict(paths)
    if args.json:
        print_json([p.to_dict() for p in preds])
    else:
        print_table(
            [[p.path, f"{p.score:.6g}", f"{p.threshold:.6g}", p.verdict] for p in preds],
            ["path", "score", "threshold", "verdict"],
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flawscope.evaluation import evaluate

    inspector = Inspector.load(args.model, device=args.device)
    dataset = _open(args)
    result = evaluate(inspector, dataset, keep_maps=args.report is not None)
    if args.report:
        from flawscope.report import write_report

        path = write_report(args.report, [result], title=f"flawscope evaluation: {args.model}")
        print(f"report written to {path}", file=sys.stderr)
    if args.json:
        print_json(result.metrics)
    else:
        keys = ["image_auroc", "image_auprc", "f1", "f1_max", "accuracy", "precision", "recall",
                "false_reject_rate", "threshold", "pixel_auroc", "aupro", "images_per_second"]
        print_table([[k, f"{result.metrics[k]:.4f}"] for k in keys if k in result.metrics],
                    ["metric", "value"])
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    inspector = Inspector.load(args.model, device=args.device)
    defects = expand_images(args.defects) if args.defects else None
    inspector.calibrate(expand_images(args.good), defects, rule=args.threshold_rule,
                        max_frr=args.max_frr)
    inspector.save(args.output)
    print(inspector.threshold.describe(), file=sys.stderr)
    print(f"model written to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flawscope.demo import run_demo

    t0 = time.perf_counter()
    reports = run_demo(args.output, models=[m.strip() for m in args.models.split(",")],
                       device=args.device, progress=not args.quiet)
    for r in reports:
        print(f"report: {r}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0
