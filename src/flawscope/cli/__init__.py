"""Command-line interface: a thin layer over the library.

Each sub-module adds its sub-commands with ``add_commands(subparsers)``; a command function
takes the parsed ``args`` and returns an exit status. User errors
(:class:`~flawscope.errors.FlawscopeError`) print one line on stderr; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from flawscope import __version__
from flawscope.errors import FlawscopeError


def build_parser() -> argparse.ArgumentParser:
    from flawscope.cli import classify, detect, serve

    parser = argparse.ArgumentParser(
        prog="flawscope",
        description="Visual inspection: learn normal parts, score new images, show defects.",
    )
    parser.add_argument("--version", action="version", version=f"flawscope {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (detect, classify, serve):
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FlawscopeError as exc:
        if debug:
            traceback.print_exc()
        print(f"flawscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flawscope: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: keep the promise of one line, unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(
                f"flawscope: internal error: {type(exc).__name__}: {exc} "
                "(run with --debug for the traceback and please report it)",
                file=sys.stderr,
            )
        return 1
