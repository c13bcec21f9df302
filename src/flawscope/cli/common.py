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

from flawscope.errors import ConfigError, DatasetError, ImageReadError, ModelFileError

#: ``flawscope.pipeline.DEFAULT_MODEL``
DEFAULT_MODEL = "patchcore"
#: ``flawscope.models.list_models()``, each with a one-line description for users
#: (``flawscope models``); lets ``fit --model`` be checked before torch is imported
MODEL_DESCRIPTIONS: dict[str, str] = {
    "conv-ae": "plain convolutional autoencoder, trained from scratch; a baseline for ncae",
    "ncae": "small autoencoder trained from scratch on your good images; fast, for textures "
            "and plain surfaces",
    "padim": "pretrained image features with a normal range per image position; quick to fit, "
             "for parts that are always in the same place",
    "patchcore": "compares every image patch with the closest patches of the good images "
                 "(pretrained features); the most accurate choice for most parts",
    "patchcore-ensemble": "patchcore on several feature extractors, scores averaged; a little "
                          "more accurate, several times slower",
}
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


#: ``flawscope.fastruntime.RUNTIMES`` (kept here so the parser needs no library import)
RUNTIMES = ("auto", "torch", "onnxruntime")


def add_runtime_option(parser: argparse.ArgumentParser) -> None:
    """``--runtime`` and ``--threads`` on a command that scores images with a model file."""
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default="auto",
        help="what scores the images: auto (default) = the model's cached onnxruntime graph "
        "(prepared by fit and calibrate, 1.6-2.4x faster on a CPU, scores within 1e-4) when "
        "there is one and the model runs on the CPU, else PyTorch; onnxruntime = that graph, "
        "exported now if needed; torch = PyTorch")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads of one model call (default: every core)")


def add_prepare_option(parser: argparse.ArgumentParser) -> None:
    """``--prepare-runtime`` on a command that writes a model file."""
    parser.add_argument(
        "--prepare-runtime", action=argparse.BooleanOptionalAction, default=None,
        help="after writing the model, export it to ONNX and cache the graph so that predict, "
        "evaluate and serve run in onnxruntime (default: yes when onnxruntime is installed "
        "and FLAWSCOPE_PREPARE_RUNTIME is not 0; a few seconds: 6 s for PatchCore at 320 px on "
        "2 cores)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" for every option with a default (help texts that already say their
    default, e.g. one per model, are left alone); description and epilog keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def frr_rate(text: str) -> float:
    """argparse type of ``--max-frr``: a share of good parts in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a share of good parts in [0, 1), e.g. 0.05 for 5 %")
    return value


def positive_int(text: str) -> int:
    """argparse type of sizes and counts: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


# Checked before the library (torch, timm) is imported, so a typo costs no start-up time.
def check_model_path(path: str | None, what: str = "") -> None:
    """A model file that exists and is a file (the content is checked when it is loaded)."""
    if path is None or "://" in str(path):
        return
    p = Path(path)
    prefix = f"{what} " if what else ""
    if not p.exists():
        raise ModelFileError(f"{prefix}{p}: no such model file")
    if p.is_dir():
        raise ModelFileError(f"{prefix}{p}: is a folder, not a model file")


def check_paths(items: Iterable[str] | None, what: str = "") -> None:
    """Image files or folders that exist (their content is checked when they are read)."""
    prefix = f"{what} " if what else ""
    for item in items or []:
        if not Path(item).exists():
            raise ImageReadError(f"{prefix}{item}: no such file or folder")


def check_folder(path: str | None, what: str = "") -> None:
    """A dataset folder that exists."""
    if path is None:
        return
    prefix = f"{what} " if what else ""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{prefix}{p}: no such folder")
    if not p.is_dir():
        raise DatasetError(f"{prefix}{p}: is a file, expected a dataset folder")


def check_model_name(name: str) -> None:
    """``fit --model NAME``: one of the registered detectors."""
    if name not in MODEL_DESCRIPTIONS:
        raise ConfigError(f"--model {name}: unknown model; choose from "
                          f"{', '.join(MODEL_DESCRIPTIONS)} (`flawscope models` describes them)")


def plural(n: int, word: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


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
