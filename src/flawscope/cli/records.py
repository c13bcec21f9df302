"""``flawscope records export | stats | prune | upgrade``: the inspection record store."""

from __future__ import annotations

import argparse
import sys

from flawscope.errors import ConfigError

DB_HELP = "the record database: a SQLite file or postgresql://USER@HOST/NAME"


def add_commands(sub: argparse._SubParsersAction) -> None:
    rec = sub.add_parser(
        "records", help="inspection records: export, review statistics, retention, schema",
        description="The records `flawscope serve` and `predict --record` write (one per "
        "verdict). See docs/station.md.")
    cmds = rec.add_subparsers(dest="records_command", metavar="ACTION")
    cmds.required = True

    exp = cmds.add_parser("export", help="records to Parquet or CSV",
                          description="Write records, oldest first, to a .parquet or .csv "
                          "file (every column; regions and details as JSON; image_path: the "
                          "kept image).")
    exp.add_argument("db", metavar="DB", help=DB_HELP)
    exp.add_argument("--since", metavar="TIME",
                     help="from this time: ISO date or time (UTC unless a zone is given) or "
                     "a duration back from now (24h, 7d)")
    exp.add_argument("--until", metavar="TIME", help="before this time (same forms)")
    exp.add_argument("--verdict", choices=["ok", "defect"])
    exp.add_argument("--reviewed", action="store_true", help="only reviewed records")
    exp.add_argument("-o", "--output", required=True, metavar="FILE",
                     help="FILE.parquet or FILE.csv")
    exp.set_defaults(func=cmd_export)

    st = cmds.add_parser("stats", help="confusion counts of the reviewed records",
                         description="False-reject share, escape rate and false-reject rate "
                         "of the reviewed records, with exact 95%% intervals.")
    st.add_argument("db", metavar="DB", help=DB_HELP)
    st.add_argument("--since", metavar="TIME")
    st.add_argument("--until", metavar="TIME")
    st.add_argument("--model", metavar="MODEL_ID", help="one model's records (its SHA-256)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_stats)

    pr = cmds.add_parser("prune", help="apply image retention limits now",
                         description="Release the kept images of unreviewed records older "
                         "than --retain-days or beyond --retain-gb (oldest first) and delete "
                         "unreferenced files. Reviewed records keep their images.")
    pr.add_argument("db", metavar="DB", help=DB_HELP)
    pr.add_argument("--images", metavar="DIR", help="the image folder (default: next to a "
                    "SQLite DB)")
    pr.add_argument("--retain-days", type=float, metavar="DAYS")
    pr.add_argument("--retain-gb", type=float, metavar="GB")
    pr.set_defaults(func=cmd_prune)

    up = cmds.add_parser("upgrade", help="upgrade the schema (serve does it at start)",
                         description="Upgrade the database's schema to this flawscope's "
                         "newest revision and print the revisions before and after.")
    up.add_argument("db", metavar="DB", help=DB_HELP)
    up.set_defaults(func=cmd_upgrade)


def _open(db: str, images: str | None = None):
    from flawscope.station.store import RecordStore

    return RecordStore(db, images)


def cmd_export(args: argparse.Namespace) -> int:
    from flawscope.station.export import export_records, parse_time
    from flawscope.station.store import RecordFilter

    where = RecordFilter(
        verdict=args.verdict, reviewed=True if args.reviewed else None,
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None)
    store = _open(args.db)
    try:
        n = export_records(store, args.output, where)
    finally:
        store.close()
    print(f"{n} records written to {args.output}", file=sys.stderr)
    return 0


def _pct(p: dict) -> str:
    if p.get("rate") is None:
        return "n/a (nothing reviewed)"
    k = f"{p['k']}/{p['n']}, " if p.get("n") is not None else ""
    return f"{p['rate']:.2%} ({k}95% CI {p['low']:.2%} - {p['high']:.2%})"


def cmd_stats(args: argparse.Namespace) -> int:
    from flawscope.cli.common import print_json, print_table
    from flawscope.station.confusion import confusion
    from flawscope.station.export import parse_time
    from flawscope.station.store import RecordFilter

    where = RecordFilter(since=parse_time(args.since, "--since") if args.since else None,
                         until=parse_time(args.until, "--until") if args.until else None,
                         model_id=args.model)
    store = _open(args.db)
    try:
        counts = store.review_counts(where)
    finally:
        store.close()
    result = confusion(counts)
    if args.json:
        print_json({"confusion": result, "queue": counts["queue"],
                    "defect_types": counts["defect_types"]})
        return 0
    c = result["counts"]
    print_table([["reject", str(c["reject"]["good"]), str(c["reject"]["defect"])],
                 ["pass", str(c["pass"]["good"]), str(c["pass"]["defect"])]],
                ["verdict \\ truth", "good", "defect"])
    print(f"inspected: {result['inspected']['total']} ({result['inspected'].get('defect', 0)} "
          f"rejected); reviewed: {result['reviewed']}; waiting for review: {counts['queue']}")
    print(f"good parts among rejects: {_pct(result['false_reject_share'])}")
    print(f"escape rate (defects among passes): {_pct(result['escape_rate'])}")
    print(f"false-reject rate (good parts rejected): {_pct(result['false_reject_rate'])}")
    if result["outside_sample"]:
        print(f"{result['outside_sample']} reviews of records outside the review sample are "
              "counted above only in 'reviewed'")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from flawscope.station.store import Retention

    if args.retain_days is None and args.retain_gb is None:
        raise ConfigError("records prune: give --retain-days and/or --retain-gb")
    retention = Retention(args.retain_days,
                          None if args.retain_gb is None else int(args.retain_gb * 1e9))
    store = _open(args.db, args.images)
    try:
        report = store.prune(retention)
    finally:
        store.close()
    print(f"{report.records} records released their images; {report.files} files removed "
          f"({report.bytes / 1e6:.1f} MB)")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    store = _open(args.db)
    before, after = store.revisions
    store.close()
    if before == after:
        print(f"{store.display_url}: schema revision {after} (the newest); nothing to do")
    else:
        print(f"{store.display_url}: schema revision {before or 'none'} -> {after}")
    return 0
