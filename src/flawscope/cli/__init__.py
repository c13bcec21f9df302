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

#: optional modules -> the extra that installs them (``pip install "flawscope[EXTRA]"``)
OPTIONAL_EXTRAS = {
    "onnx": "export", "onnxruntime": "export", "onnxscript": "export",
    "fastapi": "serve", "uvicorn": "serve", "fastapi_offline": "serve", "multipart": "serve",
    "python_multipart": "serve", "playwright": "dev",
    "hypercorn": "serve", "sqlalchemy": "serve", "alembic": "serve", "prometheus_client": "serve",
    "psycopg": "station", "pyarrow": "station",
}
#: exit statuses: 0 done, 1 defect found (predict --fail-on-defect), 2 user error,
#: 3 internal error (a bug), 130 interrupted
EXIT_INTERNAL = 3


def build_parser() -> argparse.ArgumentParser:
    from flawscope.cli import classify, detect, modelfile, records, scale, serve

    parser = argparse.ArgumentParser(
        prog="flawscope",
        description="Visual inspection: learn normal parts, score new images, show defects.",
    )
    parser.add_argument("--version", action="version", version=f"flawscope {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (detect, classify, serve, records, scale, modelfile):
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    for stream in (sys.stdout, sys.stderr):  # file names that are not valid UTF-8 print as \x..
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except FlawscopeError as exc:
        if debug:
            traceback.print_exc()
        print(f"flawscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flawscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `flawscope predict ... | head -1`: the reader has gone
        _silence_stdout()
        return 0
    except ModuleNotFoundError as exc:
        extra = OPTIONAL_EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            return _internal(exc, debug)
        if debug:
            traceback.print_exc()
        print(f"flawscope: error: this command needs the optional module {exc.name!r}: "
              f'pip install "flawscope[{extra}]"', file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: keep the promise of one line, unless --debug
        return _internal(exc, debug)


def _run(args: argparse.Namespace) -> int:
    """Run the command; ``--allow-legacy-model`` holds for every model file it loads."""
    if getattr(args, "allow_legacy_model", False):
        from flawscope.modelfile import legacy_models_allowed

        with legacy_models_allowed():
            return int(args.func(args) or 0)
    return int(args.func(args) or 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured)
        pass


def _internal(exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    else:
        print(
            f"flawscope: internal error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback and please report it)",
            file=sys.stderr,
        )
    return EXIT_INTERNAL
