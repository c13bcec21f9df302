"""Helpers shared by the CLI commands.

Light on purpose: building the parser (``flawscope --help``) must not import torch, timm,
numpy-heavy modules or FastAPI, so names the parser needs are plain constants here, checked
against the library by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flawscope.errors import ConfigError

#: ``flawscope.pipeline.DEFAULT_MODEL``
DEFAULT_MODEL = "patchcore"
#: ``flawscope.regions.DEFAULT_MIN_REGION_AREA`` (smallest defect region kept, pixels)
DEFAULT_MIN_REGION_AREA = 25.0
#: ``flawscope.pipeline.THRESHOLD_RULES``
THRESHOLD_RULES: tuple[str, ...] = ("good-quantile", "f1-optimal")


#: ``flawscope.modelfile.LEGACY_OPTION``: load a model file of format 1 as it is
LEGACY_OPTION = "--allow-legacy-model"


def add_legacy_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-legacy-model`` on a command that loads model files (see :func:`main`)."""
    parser.add_argument(
        LEGACY_OPTION, dest="allow_legacy_model", action="store_true",
        help="load a model file of format 1, whose settings (threshold, sizes) no checksum "
        "covers, so an edit cannot be detected; better: re-sign it once with `flawscope "
        "modelfile upgrade FILE`")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" for every option with a default (help texts that already say their
    default, e.g. one per model, are left alone); description and epilog keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def parse_params(pairs: Iterable[str] | None) -> dict[str, Any]:
    """``["widths=[16,32]", "map_sigma=3"]`` -> dict; values are JSON, else plain strings."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--param {pair}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


def jsonable(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def print_json(obj: Any) -> None:
    json.dump(jsonable(obj), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
