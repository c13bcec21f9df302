"""``flawscope predict --engine ray`` and ``flawscope fit-many``: beyond one machine.

Light at import (no ray, torch or pyarrow): ``ray`` is imported only when a command asks for
the Ray engine.
"""

from __future__ import annotations

import argparse
import sys
import time

from flawscope.cli.common import HelpFormatter, print_json, print_table
from flawscope.errors import ConfigError

ENGINES = ("local", "ray")
#: ``flawscope.scale.batch.DEFAULT_BATCH_SIZE``
DEFAULT_BATCH_SIZE = 64
#: seconds between progress lines
PROGRESS_EVERY = 10.0


# ---------------------------------------------------------------------------- predict
def add_engine_options(pred: argparse.ArgumentParser) -> None:
    """``--engine``, ``--address``, ``-o`` and the worker options of ``predict``."""
    group = pred.add_argument_group(
        "scaling out (--engine ray)",
        "Score an archive on Ray Data: IMAGE_OR_DIR may also be a glob, a list file (one image "
        "per line) or a URI pyarrow reads (s3://, gs://, hdfs://...). Rows go to a Parquet "
        "folder (-o); a re-run skips images already there; unreadable images are error rows.")
    group.add_argument("--engine", choices=ENGINES, default="local",
                       help="local: this process (default); ray: a Ray cluster or a local "
                       "Ray instance (pip install 'flawscope[ray]')")
    group.add_argument("--address", metavar="ADDR",
                       help="Ray cluster: auto, ray://HOST:10001 or HOST:6379 (default: start "
                       "a local instance on this machine's cores)")
    group.add_argument("-o", "--output", metavar="DIR.parquet",
                       help="results folder of Parquet parts (with --engine ray)")
    group.add_argument("--workers", type=int, metavar="N",
                       help="model actors (default: the cluster's CPUs / --cpus-per-worker)")
    group.add_argument("--cpus-per-worker", type=float, metavar="N",
                       help="CPUs (and torch threads) per actor (default: 1)")
    group.add_argument("--batch-size", type=int, metavar="N",
                       help=f"images per block handed to an actor (default: "
                       f"{DEFAULT_BATCH_SIZE})")


def engine_dispatch(args: argparse.Namespace) -> int | None:
    """Run ``predict --engine ray``; None for the local engine (after refusing Ray options)."""
    if args.engine == "local":
        given = [opt for opt, value in (
            ("--address", args.address), ("-o", args.output), ("--workers", args.workers),
            ("--cpus-per-worker", args.cpus_per_worker), ("--batch-size", args.batch_size),
        ) if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --engine ray (plain predict "
                              "writes its rows with --csv)")
        return None
    return cmd_predict_ray(args)


def cmd_predict_ray(args: argparse.Namespace) -> int:
    refused = [opt for opt, on in (("--json", args.json), ("--csv", args.csv),
                                   ("--save-overlays", args.save_overlays),
                                   ("--fail-on-defect", args.fail_on_defect)) if on]
    if refused:
        raise ConfigError(f"{', '.join(refused)}: not with --engine ray (its rows go to the "
                          "Parquet folder -o)")
    if not args.output:
        raise ConfigError("--engine ray needs -o RESULTS.parquet (a folder of Parquet parts)")
    if args.device not in ("auto", "cpu"):
        raise ConfigError(f"--device {args.device}: the Ray workers score on CPU (auto or cpu)")
    from flawscope.scale.batch import score_archive

    last = [time.monotonic()]

    def progress(s) -> None:
        if time.monotonic() - last[0] >= PROGRESS_EVERY or s.done == s.todo:
            last[0] = time.monotonic()
            print(f"scored {s.done}/{s.todo} ({s.errors} errors, {s.images_per_second:.1f} "
                  "images/s)", file=sys.stderr)

    region = {"min_region_area": args.min_region_area, "mm_per_pixel": args.mm_per_pixel,
              "min_region_mm2": args.min_region_mm2}
    s = score_archive(args.model, args.images, args.output, address=args.address,
                      workers=args.workers, cpus_per_worker=args.cpus_per_worker or 1,
                      batch_size=args.batch_size or DEFAULT_BATCH_SIZE, device=args.device,
                      region_options=region, progress=progress)
    if s.already:
        print(f"{s.already} of {s.total} images already in {s.output}: skipped",
              file=sys.stderr)
    if not s.todo:
        print(f"nothing to score: all {s.total} images are in {s.output}")
        return 0
    rate = (f", {s.images_per_second:.1f} images/s on {s.workers} "
            f"worker{'s' if s.workers != 1 else ''}") if s.done else ""
    print(f"{s.done} images scored: {s.defects} defect, {s.done - s.defects - s.errors} ok, "
          f"{s.errors} errors{rate}; results in {s.output}")
    return 0


# ---------------------------------------------------------------------------- fit-many
def add_commands(sub: argparse._SubParsersAction) -> None:
    fm = sub.add_parser(
        "fit-many", help="fit one model per part number from a CSV manifest (local or Ray)",
        description="Fit every row of MANIFEST (CSV: data, output, and optionally name, model, "
        "format, max_frr, threshold_rule, any detector option such as image_size, and params "
        "as a JSON object; relative paths are relative to the manifest) as `flawscope fit` "
        "does, evaluate it where the dataset has a test split, and print a summary. A row that "
        "fails is reported; the others go on.",
        epilog="exit status: 0 every row fitted; 1 some rows failed (the others are written); "
        "2 a bad manifest or option.",
        formatter_class=HelpFormatter,
    )
    fm.add_argument("manifest", metavar="MANIFEST.csv")
    fm.add_argument("--engine", choices=ENGINES, default="local",
                    help="local: one after another in this process; ray: one Ray task per "
                    "row (pip install 'flawscope[ray]')")
    fm.add_argument("--address", metavar="ADDR",
                    help="Ray cluster: auto, ray://HOST:10001 or HOST:6379 (default: a local "
                    "Ray instance)")
    fm.add_argument("--cpus-per-model", type=float, default=1, metavar="N",
                    help="CPUs (and torch threads) per Ray task")
    fm.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    fm.add_argument("--json", action="store_true", help="print the summary as JSON")
    fm.add_argument("--summary", metavar="FILE.csv", help="also write the summary as CSV")
    fm.add_argument("--quiet", action="store_true", help="no progress lines")
    fm.set_defaults(func=cmd_fit_many)


def cmd_fit_many(args: argparse.Namespace) -> int:
    from flawscope.scale.fit_many import fit_many

    if args.engine == "local" and args.address:
        raise ConfigError("--address: only with --engine ray")
    if args.engine == "ray" and args.device not in ("auto", "cpu"):
        raise ConfigError(f"--device {args.device}: the Ray workers fit on CPU (auto or cpu)")
    if args.summary:
        from flawscope.io import check_writable

        check_writable(args.summary, "--summary")
    t0 = time.perf_counter()

    def report(event) -> None:
        if args.quiet:
            return
        elapsed = f"{time.perf_counter() - t0:.0f} s"
        if event.kind == "start":
            print(f"[{event.finished + 1}/{event.total}] {event.job.name}: fitting "
                  f"{event.job.model} on {event.job.data}", file=sys.stderr)
        elif event.kind == "waiting":
            print(f"{event.finished}/{event.total} done, still fitting ({elapsed})",
                  file=sys.stderr)
        else:
            r = event.result
            what = (f"ok, fit {r.fit_seconds:.1f} s" + (
                f", AUROC {r.image_auroc:.4f}" if r.image_auroc is not None else "")
                + f" -> {r.output}") if r.status == "ok" else f"FAILED: {r.error}"
            print(f"[{event.finished}/{event.total}] {r.name}: {what} ({elapsed})",
                  file=sys.stderr)

    results = fit_many(args.manifest, engine=args.engine, address=args.address,
                       cpus_per_model=args.cpus_per_model, device=args.device, report=report)
    rows = [r.to_dict() for r in results]
    if args.summary:
        _write_summary(args.summary, rows)
    if args.json:
        print_json(rows)
    else:
        print_table([[r["name"], r["model"], r["status"],
                      "" if r["image_auroc"] is None else f"{r['image_auroc']:.4f}",
                      "" if r["fit_seconds"] is None else f"{r['fit_seconds']:.1f}",
                      r["output"] if r["status"] == "ok" else r["error"]] for r in rows],
                    ["name", "model", "status", "auroc", "fit_s", "output / error"])
    n_failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows) - n_failed} of {len(rows)} models fitted in "
          f"{time.perf_counter() - t0:.1f} s ({args.engine} engine)"
          + (f"; {n_failed} failed" if n_failed else ""), file=sys.stderr)
    return 1 if n_failed else 0


def _write_summary(path: str, rows: list[dict]) -> None:
    import csv
    import io

    from flawscope.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
