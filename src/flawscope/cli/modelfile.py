"""``flawscope modelfile upgrade FILE``: re-sign a model file in the current format."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser("modelfile", help="model file maintenance (upgrade the format)")
    cmds = top.add_subparsers(dest="modelfile_command", metavar="COMMAND")
    cmds.required = True
    up = cmds.add_parser(
        "upgrade", help="rewrite a model file in the current format (header checksum)",
        description="Rewrite FILE in the current model format, whose checksum covers the "
        "settings (threshold, sizes, ...) as well as the weights. The file must pass every "
        "check first (format, schema of its settings, checksums it has); a format-1 file has "
        "no checksum of its settings, so upgrading it vouches for them: check the threshold "
        "printed here is the one you expect.",
    )
    up.add_argument("file", metavar="FILE")
    up.add_argument("-o", "--output", metavar="OUT", help="write here (default: replace FILE)")
    up.set_defaults(func=cmd_upgrade)


def cmd_upgrade(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flawscope.modelfile import FORMAT_VERSION, load_model, read_metadata, upgrade_model_file

    from_version = (read_metadata(Path(args.file)).get("format_version")
                    if Path(args.file).is_file() else None)
    written = upgrade_model_file(args.file, args.output)
    config, _ = load_model(written)  # what was written loads without any flag
    threshold = config.get("threshold") if isinstance(config, dict) else None
    kept = (f"; threshold {threshold['value']:.6g} ({threshold.get('rule')})"
            if isinstance(threshold, dict) else "")
    print(f"{written}: model format {from_version} -> {FORMAT_VERSION}, re-signed{kept}")
    return 0
