"""``flawscope fit | predict | evaluate | demo``: anomaly detection from good parts.

Module-level imports stay light (no torch, timm or numpy): the library is imported inside the
command functions, so ``flawscope --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flawscope.cli.common import (
    DEFAULT_MIN_REGION_AREA,
    DEFAULT_MODEL,
    MODEL_DESCRIPTIONS,
    THRESHOLD_RULES,
    HelpFormatter,
    add_legacy_option,
    add_prepare_option,
    add_runtime_option,
    check_folder,
    check_model_name,
    check_model_path,
    check_paths,
    frr_rate,
    parse_params,
    plural,
    positive_int,
    print_json,
    print_table,
)
from flawscope.cli.scale import add_engine_options, engine_dispatch
from flawscope.errors import ConfigError
from flawscope.layouts import LAYOUT_HELP
from flawscope.layouts import LAYOUTS as READERS  # flawscope.data.dataset.READERS' names


def add_commands(sub: argparse._SubParsersAction) -> None:
    fit = sub.add_parser(
        "fit", help="train a detector on good images and calibrate its threshold",
        description="Train an anomaly detector on the good training images of DATA (or of "
        "--good), calibrate the OK/defect threshold for a stated false-reject rate, and save "
        "one model file.",
        epilog=LAYOUT_HELP, formatter_class=HelpFormatter,
    )
    fit.add_argument("data", metavar="DATA", nargs="?",
                     help="dataset folder, layout auto-detected (see below); or use --good")
    fit.add_argument("--good", metavar="DIR", nargs="+",
                     help="instead of DATA: folders (searched recursively) or files of good-part "
                     "images; 70 %% train / 30 %% held out by file-name hash, as in the folder "
                     "layout")
    fit.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write")
    fit.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                     help="detector; `flawscope models` lists the registered ones")
    fit.add_argument("--format", default="auto", choices=["auto", *READERS],
                     help="dataset layout of DATA; auto detects it from the folder names")
    fit.add_argument("--defects", "--defect", metavar="DIR", nargs="+",
                     help="labelled defect images (files or folders), optional: used by the "
                     "learned score and the f1-optimal threshold (default: none, or the "
                     "dataset's training defects, e.g. casting train/def_front)")
    fit.add_argument("--image-size", type=positive_int, metavar="SIZE",
                     help="model input size (default: 320 for patchcore, padim and "
                     "patchcore-ensemble, meaning about SIZE^2 pixels at the photos' aspect "
                     "ratio; 128 x 128 for ncae and conv-ae)")
    fit.add_argument("--channels", type=int, choices=[1, 3],
                     help="1 (gray) or 3 (colour) model input (default: the images' own)")
    fit.add_argument("--epochs", type=positive_int,
                     help="training epochs (autoencoders; default: 30)")
    fit.add_argument("--score", dest="score_rule", metavar="RULE",
                     help="image score rule (autoencoders): a residual statistic, map-max or "
                     "learned (default: map-max)")
    fit.add_argument("--backbone", metavar="NAME",
                     help="timm backbone (patchcore, padim; default: tf_efficientnet_lite0)")
    fit.add_argument("--weights", metavar="FILE|random",
                     help="backbone weights: a .safetensors/.pth file, or 'random' (patchcore, "
                     "padim; default: ImageNet weights from the installed package)")
    fit.add_argument("--coreset-ratio", type=float, metavar="R",
                     help="share of training patches kept in the memory bank (patchcore; "
                     "default: 0.1)")
    fit.add_argument("--tile", dest="tile_input_size", type=positive_int, metavar="SIZE",
                     help="load images at SIZE and score them as overlapping tiles of the image "
                     "size, for small defects in large images (patchcore, padim; default: off)")
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    fit.add_argument("--batch-size", type=positive_int, metavar="N",
                     help="images per batch (default: 16 for patchcore, padim and "
                     "patchcore-ensemble; 32 for the autoencoders)")
    fit.add_argument("--seed", type=int, help="random seed (default: 0)")
    fit.add_argument("--max-frr", type=frr_rate, default=0.01, metavar="RATE",
                     help="largest share of good parts to reject")
    fit.add_argument("--threshold-rule", default="good-quantile", choices=THRESHOLD_RULES,
                     help="how the OK/defect threshold is set")
    fit.add_argument("--param", action="append", metavar="KEY=VALUE",
                     help="any other model option, JSON value (repeatable; default: none)")
    fit.add_argument("--skip-bad", action="store_true",
                     help="leave out unreadable images (listed on stderr) instead of stopping")
    fit.add_argument("--resume", action="store_true",
                     help="continue an interrupted training run from MODEL.ckpt")
    fit.add_argument("--quiet", action="store_true",
                     help="no progress output (when stderr is not a terminal, e.g. a log "
                     "file, progress is plain lines, one per epoch or phase, not a bar)")
    add_prepare_option(fit)
    fit.set_defaults(func=cmd_fit)

    pred = sub.add_parser(
        "predict", help="score images: score, verdict, threshold and defect regions per image",
        description="Score images with MODEL (a model file or an exported .onnx): raw and "
        "normalised score (threshold at 0.5), OK/defect verdict and the defect regions of each "
        "image, then a summary line.",
        epilog="exit status: 0 done (with --fail-on-defect: every part OK); 1 with "
        "--fail-on-defect when at least one part is defective; 2 an error (unreadable image "
        "or model file, bad option); 3 an internal error (a bug: please report it).",
    )
    pred.add_argument("model", metavar="MODEL")
    add_legacy_option(pred)
    pred.add_argument("images", metavar="IMAGE_OR_DIR", nargs="+")
    pred.add_argument("--json", action="store_true", help="print one JSON list")
    pred.add_argument("--csv", metavar="FILE",
                      help="also write path, score, normalized_score, verdict, n_regions and "
                      "largest region area per image to FILE")
    pred.add_argument("--save-overlays", metavar="DIR",
                      help="write one PNG per image to DIR: image, heat map, region outlines, "
                      "with the verdict, score, threshold, file name and a colour bar below")
    pred.add_argument("--fail-on-defect", action="store_true",
                      help="exit with status 1 when any image is a defect")
    pred.add_argument("--record", metavar="DB", help="also record every verdict in DB, as "
                      "`serve --db` does (a SQLite file or postgresql://...; docs/station.md)")
    pred.add_argument("--classifier", metavar="FILE", action="append",
                      help="defect-type classifier (classify fit --defects-only): names the "
                      "type of every rejected part, with its probability; repeat to average "
                      "several (e.g. --input image and region models)")
    _add_region_options(pred)
    pred.add_argument("--skip-bad", action="store_true",
                      help="skip unreadable images (listed on stderr) instead of stopping")
    pred.add_argument("--device", default="auto")
    add_runtime_option(pred)
    add_engine_options(pred)  # --engine ray: flawscope.cli.scale
    pred.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="metrics of a model on the test split of a dataset")
    ev.add_argument("model", metavar="MODEL")
    add_legacy_option(ev)
    ev.add_argument("data", metavar="DATA")
    ev.add_argument("--format", default="auto", choices=["auto", *READERS])
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--report", metavar="DIR", help="write an HTML report to DIR")
    ev.add_argument("--per-image", metavar="FILE",
                    help="write one CSV row per test image: path, label, score, verdict, "
                    "regions and (with masks) pixel IoU and ground-truth regions found")
    ev.add_argument("--statistics", metavar="FILE",
                    help="autoencoders (ncae, conv-ae): write one CSV row per test image with "
                    "path, label, defect_type, score and every residual statistic (raw values: "
                    "min is not negated), to pick a score rule and threshold")
    _add_region_options(ev)
    ev.add_argument("--skip-bad", action="store_true",
                    help="leave out unreadable images (listed on stderr) instead of stopping")
    ev.add_argument("--device", default="auto")
    add_runtime_option(ev)
    ev.add_argument("--quiet", action="store_true",
                    help="no progress output (when stderr is not a terminal, progress is a few "
                    "plain lines with the time left, not a bar)")
    ev.set_defaults(func=cmd_evaluate)

    cal = sub.add_parser(
        "calibrate", help="set a model's threshold: a new false-reject target, or new images",
        description="Set MODEL's threshold and write a new model file, without refitting. "
        "With only --max-frr: from the good-image scores stored in MODEL at fit time (no "
        "images needed; `flawscope evaluate` shows what each target gives). With good images "
        "it was not fitted on (and labelled defects for the f1-optimal rule): from their "
        "scores, e.g. after a change on the line.",
        epilog="examples: flawscope calibrate part.safetensors --max-frr 0.05 -o "
        "part-5pct.safetensors; flawscope calibrate part.safetensors new-good/ -o "
        "part-recal.safetensors",
    )
    cal.add_argument("model", metavar="MODEL")
    add_legacy_option(cal)
    cal.add_argument("good", metavar="GOOD_IMAGE_OR_DIR", nargs="*",
                     help="good images (files or folders) to set the threshold on; leave out "
                     "to use the scores stored in MODEL (needs --max-frr)")
    cal.add_argument("-o", "--output", required=True, metavar="NEW_MODEL")
    cal.add_argument("--defects", metavar="IMAGE_OR_DIR", nargs="+")
    cal.add_argument("--max-frr", type=frr_rate, metavar="RATE",
                     help="largest share of good parts to reject, e.g. 0.05 for 5 %% "
                     "(default with images: 0.01)")
    cal.add_argument("--threshold-rule", default="good-quantile", choices=THRESHOLD_RULES)
    cal.add_argument("--allow-training-images", action="store_true",
                     help="calibrate even on images the model was trained on (refused by "
                     "default: their scores are too low, so more good parts would be rejected)")
    cal.add_argument("--device", default="auto")
    add_prepare_option(cal)
    cal.set_defaults(func=cmd_calibrate)

    demo = sub.add_parser(
        "demo", help="generate data, fit, evaluate and write a report",
        description="The whole workflow on generated data: a synthetic MVTec-style dataset "
        "(tile, washer), one model per category, evaluation and an HTML report each; ends "
        "with the paths written and the command to serve a model.",
        formatter_class=HelpFormatter,
    )
    demo.add_argument("-o", "--output", default="flawscope-demo", metavar="DIR",
                      help="folder for data, models and reports")
    demo.add_argument("--models", default=DEFAULT_MODEL, metavar="NAME[,NAME...]",
                      help="comma-separated detectors (`flawscope models`); e.g. "
                      "ncae,patchcore for a side-by-side report (several minutes longer)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="list the registered detectors and their options",
                            formatter_class=HelpFormatter)
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=cmd_models)


def _add_region_options(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("--min-region-area", type=float, metavar="PX",
                        help="smallest defect region in original-image pixels (default "
                        f"{DEFAULT_MIN_REGION_AREA:g})")
    parser.add_argument("--mm-per-pixel", type=float, metavar="MM",
                        help="image scale: adds area_mm2 to every region")
    parser.add_argument("--min-region-mm2", type=float, metavar="MM2",
                        help="smallest defect region in mm^2 (needs --mm-per-pixel)")


def _region_kwargs(args: argparse.Namespace) -> dict:
    return {"min_region_area": args.min_region_area, "mm_per_pixel": args.mm_per_pixel,
            "min_region_mm2": args.min_region_mm2}


def _write_csv(path: str | Path, rows: list[dict], columns: list[str]) -> Path:
    """``rows`` as CSV with ``columns``, written atomically."""
    import csv
    import io

    from flawscope.io import atomic_write_text

    if Path(path).is_dir():
        raise ConfigError(f"{path}: is a folder; give a CSV file name")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def _save_overlays(folder: str | Path, inspector, preds) -> None:
    """One PNG per prediction in ``folder``: image + heat map + region outlines, captioned
    with the verdict, score, threshold and file name, and a colour bar."""
    from flawscope.data.images import read_image
    from flawscope.heatmap import captioned_overlay_rgb, overlay_rgb, png_bytes, scale_map
    from flawscope.io import atomic_write_bytes

    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--save-overlays {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    scale = inspector.map_scale
    used: set[str] = set()
    for p in preds:
        image = read_image(p.path, channels=3, size=inspector.input_size)
        values = scale_map(p.anomaly_map, scale, inspector.normalization)
        mask = p.region_mask  # the regions' pixels, decided with the verdict
        name = Path(p.path).stem
        stem, k = name, 1
        while name in used:  # same file name in different folders
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        rgb = captioned_overlay_rgb(overlay_rgb(image, values, regions=mask),
                                    verdict=p.verdict, score=p.score, threshold=p.threshold,
                                    name=str(p.path), scale=scale)
        atomic_write_bytes(out / f"{name}.png", png_bytes(rgb))


def _model_options(args: argparse.Namespace) -> dict:
    opts = parse_params(args.param)
    for name in ("image_size", "channels", "epochs", "score_rule", "batch_size", "seed",
                 "backbone", "weights", "coreset_ratio", "tile_input_size"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    opts["device"] = args.device
    if args.quiet:
        opts["progress"] = False
    return opts


def _open(args: argparse.Namespace):
    """``args.data`` as a dataset (or fit's ``--good`` images); ``--skip-bad`` lists unreadable
    files and leaves them out."""
    from flawscope.data.dataset import open_dataset, open_folders

    if getattr(args, "good", None):
        dataset = open_folders(args.good)
    else:
        dataset = open_dataset(args.data, args.format)
    if args.skip_bad:
        dataset = dataset.without_unreadable()
        for _, reason in dataset.skipped:
            print(f"skipped: {reason}", file=sys.stderr)
    return dataset


def cmd_fit(args: argparse.Namespace) -> int:
    if args.data is None and not args.good:
        raise ConfigError("fit: give a dataset folder DATA or good images with --good DIR "
                          "(layouts: `flawscope fit --help`)")
    if args.data is not None and args.good:
        raise ConfigError(f"fit: give either DATA ({args.data}) or --good, not both")
    if args.good and args.format != "auto":
        raise ConfigError("--format applies to DATA; --good takes plain image folders")
    check_model_name(args.model)  # before torch is imported
    check_folder(args.data)
    check_paths(args.good, "--good")
    check_paths(args.defects, "--defects")
    from flawscope.io import check_writable

    out = check_writable(args.output, "-o")  # before the training, not after it
    from flawscope.data.images import expand_images
    from flawscope.models.registry import check_options
    from flawscope.pipeline import Inspector

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
    source = "--good images" if args.good else f"{dataset.format} layout"
    print(f"{dataset.root}: {source}, {n_train} good training images, "
          f"{len(dataset.test)} test images", file=sys.stderr)
    inspector = Inspector.train(
        dataset, args.model, max_frr=args.max_frr, threshold_rule=args.threshold_rule,
        defects=defects, checkpoint=ckpt, resume=args.resume, **options,
    )
    inspector.save(out)
    ckpt.unlink(missing_ok=True)
    prepare_runtime(args.prepare_runtime, inspector, out)
    split = inspector.info["split"]
    h, w = inspector.input_size
    print(f"{args.model}: learned from {split['fit']} good images at {h}x{w} px; threshold "
          f"scores: {split['calibration_method']} ({split['calibration']})", file=sys.stderr)
    print(inspector.threshold.describe(), file=sys.stderr)
    print(f"model written to {out}")
    print(f"next: flawscope predict {out} IMAGE_OR_DIR, or flawscope serve {out}",
          file=sys.stderr)
    return 0


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads (onnxruntime gets them with the session)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def prepare_runtime(wanted: bool | None, inspector, path: Path,
                    scored_like: str | None = None) -> None:
    """After writing a model file: cache its onnxruntime graph (``--prepare-runtime``; None:
    when onnxruntime is installed, the model runs on the CPU and FLAWSCOPE_PREPARE_RUNTIME is
    not 0), saying how long it took; a model that cannot be exported stays on PyTorch.
    ``scored_like``: a model file whose scores this one shares (``calibrate`` changes only the
    threshold): its cached graph is reused, not exported again."""
    from flawscope.export import ExportError
    from flawscope.fastruntime import (
        auto_prepare_wanted,
        onnxruntime_available,
        prepare,
        reuse_export,
    )

    if wanted is False:
        return
    if scored_like is not None and reuse_export(scored_like, path) is not None:
        return  # a copy: costs nothing, so whenever the graph is there
    if wanted is None:
        wanted = auto_prepare_wanted(inspector)
    if not wanted:
        return
    if not onnxruntime_available():
        raise ConfigError("--prepare-runtime: onnxruntime/onnx/onnxscript are not installed: "
                          "pip install 'flawscope[export]'")
    print("preparing the onnxruntime graph for predict, evaluate and serve "
          "(--no-prepare-runtime skips this) ...", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        graph = prepare(inspector, path)
    except (ExportError, OSError) as exc:  # OSError: a read-only or full cache folder
        print(f"note: {path} runs in PyTorch: no onnxruntime graph ({exc})", file=sys.stderr)
        return
    print(f"onnxruntime graph ready in {time.perf_counter() - t0:.0f} s ({graph})",
          file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    check_model_path(args.model)  # before torch is imported: a typo costs no start-up time
    if args.engine == "local":  # Ray's sources may be patterns or archives
        check_paths(args.images)
    for c in args.classifier or []:
        check_model_path(c, "--classifier")
    if (status := engine_dispatch(args)) is not None:  # --engine ray
        return status
    from flawscope.data.images import expand_images
    from flawscope.runtime import load_any_model  # a model file or an exported .onnx
    from flawscope.twostage import TYPE_COLUMNS, load_type_classifier, name_defects, with_types

    set_threads(args.threads)
    inspector = load_any_model(args.model, device=args.device, runtime=args.runtime,
                               threads=args.threads)
    clf = [load_type_classifier(c, args.device) for c in args.classifier or []]
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
    rule = inspector.region_rule(**_region_kwargs(args))  # checks the options first
    preds = inspector.predict(paths, with_maps=bool(args.save_overlays or args.record),
                              region_rule=rule)
    types = name_defects(clf, preds) if clf else None
    if args.json:
        print_json(with_types([p.to_dict() for p in preds], types))
    else:
        print_table(
            with_types([[p.path, f"{p.score:.6g}", f"{p.normalized_score:.3f}",
                         f"{p.threshold:.6g}", p.verdict, str(len(p.regions))] for p in preds],
                       types, "table"),
            ["path", "score", "normalized", "threshold", "verdict", "regions",
             *(["defect type"] if clf else [])],
        )
    if args.csv:
        from flawscope.pipeline import ROW_COLUMNS

        _write_csv(args.csv, with_types([p.to_row() for p in preds], types, "csv"),
                   [*ROW_COLUMNS, *(TYPE_COLUMNS if clf else [])])
    if args.save_overlays:
        _save_overlays(args.save_overlays, inspector, preds)
    if args.record:
        from flawscope.station.recorder import record_predictions

        ids = record_predictions(args.record, args.model, inspector, preds)
        print(f"{len(ids)} verdicts recorded in {args.record}", file=sys.stderr)
    n_defect = sum(p.verdict == "defect" for p in preds)
    summary = (f"{plural(len(preds), 'image')}: {n_defect} defect, {len(preds) - n_defect} ok; "
               f"threshold {inspector.threshold.value:.6g}; runtime {inspector.runtime}")
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return 1 if args.fail_on_defect and n_defect else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    check_model_path(args.model)  # before torch is imported
    check_folder(args.data)
    from flawscope.evaluation import evaluate
    from flawscope.runtime import is_onnx_file, load_any_model

    set_threads(args.threads)
    runtime = args.runtime  # residual statistics come from the PyTorch detector
    if args.statistics and not is_onnx_file(args.model):
        runtime = "torch"
    inspector = load_any_model(args.model, device=args.device, runtime=runtime,
                               threads=args.threads)
    if args.statistics:
        _check_statistics(args, inspector)
    dataset = _open(args)
    rule = inspector.region_rule(**_region_kwargs(args))
    print(f"{dataset.root}: {len(dataset.test)} test images", file=sys.stderr)
    result = evaluate(inspector, dataset, keep_maps=args.report is not None, rule=rule,
                      progress=not args.quiet)
    for warning in result.warnings:
        print(warning, file=sys.stderr)
    if args.per_image:
        columns = ["path", "label", "defect_type", "score", "verdict", "n_regions",
                   "largest_region_area_px"]
        if result.region_stats is not None:
            columns += ["pixel_iou", "gt_regions", "gt_regions_found", "false_regions"]
        _write_csv(args.per_image, result.per_image(), columns)
        print(f"per-image results written to {args.per_image}", file=sys.stderr)
    if args.statistics:
        from flawscope.residual import STATISTICS

        _write_csv(args.statistics, result.statistics_rows(),
                   ["path", "label", "defect_type", "score", *STATISTICS])
        print(f"residual statistics written to {args.statistics}", file=sys.stderr)
    if args.report:
        from flawscope.report import write_report

        result.info["model_path"] = args.model  # the report's calibrate command names it
        path = write_report(args.report, [result], title=f"flawscope evaluation: {args.model}")
        print(f"report written to {path}", file=sys.stderr)
    if args.json:
        print_json({**result.metrics, "operating_points": result.operating_summary(args.model)})
    else:
        keys = ["image_auroc", "image_auprc", "f1", "f1_max", "accuracy", "precision", "recall",
                "false_reject_rate", "threshold", "pixel_auroc", "aupro", "pixel_threshold",
                "pixel_f1", "pixel_iou", "region_precision", "region_recall", "region_f1",
                "images_per_second"]
        print_table([[k, f"{result.metrics[k]:.4f}"] for k in keys if k in result.metrics],
                    ["metric", "value"])
        print()
        _print_operating_points(result, args.model)
    return 0


def _rate(value: float) -> str:
    """0.005 -> "0.5 %"; NaN -> "n/a"."""
    import math

    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.4g} %"


def _print_operating_points(result, model: str) -> None:
    """The operating-point table of ``evaluate``: per false-reject target the threshold from
    the model's calibration goods, and recall and false-reject rate on the test set."""
    import math

    from flawscope.runtime import is_onnx_file

    points = result.operating_points
    if not points and is_onnx_file(model):
        print("operating points: an ONNX export holds no calibration scores; evaluate the "
              "model file it came from to see recall at other false-reject targets")
        return
    if not points:
        print("operating points: this model file has no stored calibration scores (written by "
              "an older flawscope); refit it to see recall at other false-reject targets")
        return

    def fmt(v: float) -> str:
        return "n/a" if not math.isfinite(v) else f"{v:.4f}"

    n_good = points[0].n_good
    print(f"operating points: thresholds from {n_good} calibration good images; recall and "
          "false-reject rate measured on the test set")
    rows = []
    for p in points:
        label = _rate(p.max_frr) + (" (model)" if p.max_frr == result.model_frr else "")
        if not p.certified:
            label += " *"
        rows.append([label, f"{p.threshold:.6g}", fmt(p.recall), fmt(p.frr_test)])
    if result.f1_point is not None:
        p = result.f1_point
        rows.append(["f1-optimal (test labels)", f"{p.threshold:.6g}", fmt(p.recall),
                     fmt(p.frr_test)])
    print_table(rows, ["false-reject target", "threshold", "recall", "test FRR"])
    if any(not p.certified for p in points):
        print(f"* {n_good} calibration images are too few to certify this target; the "
              "largest calibration score is used")
    line = result.recommendation(model)
    if line:
        print(f"recommendation: {line}")


def _check_statistics(args: argparse.Namespace, inspector) -> None:
    """Refuse ``--statistics`` before evaluating a model without residual statistics, and an
    unwritable CSV path."""
    from flawscope.evaluation import ResidualStatistics
    from flawscope.io import check_writable

    detector = inspector.detector
    if detector is None:
        raise ConfigError(f"--statistics: {args.model} is an ONNX export; residual statistics "
                          "come from the model file it was exported from")
    if not isinstance(detector, ResidualStatistics):
        raise ConfigError(
            f"--statistics: model {args.model} is {detector.model_name!r}, which has no "
            "residual statistics; only the autoencoders (ncae, conv-ae) have them")
    check_writable(args.statistics, "--statistics")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from flawscope.io import check_writable

    stored = not args.good
    if stored:
        if args.defects or args.threshold_rule != "good-quantile":
            raise ConfigError("calibrate: --defects and --threshold-rule f1-optimal need good "
                              "images too: flawscope calibrate MODEL GOOD_DIR --defects DIR ...")
        if args.max_frr is None:
            raise ConfigError("calibrate: give good images to calibrate on, or --max-frr RATE "
                              "to use the good-image scores stored in MODEL (e.g. --max-frr "
                              "0.05)")
    check_model_path(args.model)
    check_paths(args.good, "GOOD_IMAGE_OR_DIR")
    check_paths(args.defects, "--defects")
    check_writable(args.output, "-o")
    from flawscope.data.images import expand_images
    from flawscope.pipeline import Inspector

    inspector = Inspector.load(args.model, device=args.device)
    old = inspector.threshold
    if stored:
        inspector.set_operating_point(args.max_frr)
    else:
        defects = expand_images(args.defects) if args.defects else None
        inspector.calibrate(expand_images(args.good), defects, rule=args.threshold_rule,
                            max_frr=0.01 if args.max_frr is None else args.max_frr,
                            allow_training_images=args.allow_training_images)
    inspector.save(args.output)
    prepare_runtime(args.prepare_runtime, inspector, Path(args.output), scored_like=args.model)
    print(f"old: {old.describe()}", file=sys.stderr)
    print(f"new: {inspector.threshold.describe()}", file=sys.stderr)
    change = (inspector.threshold.value - old.value) / abs(old.value) if old.value else None
    if change is not None:
        print(f"threshold {old.value:.6g} -> {inspector.threshold.value:.6g} ({change:+.1%})",
              file=sys.stderr)
    print(f"model written to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flawscope.models import list_models

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in list_models()]
    if not models or unknown:
        raise ConfigError(f"--models {args.models}: unknown detector(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(list_models())}")
    from flawscope.demo import run_demo

    t0 = time.perf_counter()
    result = run_demo(args.output, models=models, device=args.device, progress=not args.quiet)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    prog = sys.argv[0] if Path(sys.argv[0]).name == "flawscope" else "flawscope"
    print(result.next_steps(prog))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The registry's detectors: name, a one-line description, options with their defaults."""
    import inspect

    from flawscope.models import get_model_class, list_models

    rows = []
    for name in list_models():
        cls = get_model_class(name)
        doc = (inspect.getdoc(cls) or "").splitlines()
        defaults = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for key, p in inspect.signature(init).parameters.items():
                if key != "self" and p.default is not inspect.Parameter.empty:
                    defaults[key] = p.default
        summary = MODEL_DESCRIPTIONS.get(name) or (doc[0] if doc else "")
        rows.append({"name": name, "default": name == DEFAULT_MODEL,
                     "summary": summary, "options": defaults})
    if args.json:
        print_json(rows)
    else:
        print_table([[r["name"] + (" (default)" if r["default"] else ""), r["summary"]]
                     for r in rows], ["model", "description"])
        print("options: flawscope models --json; set them with fit --param KEY=VALUE",
              file=sys.stderr)
    return 0
