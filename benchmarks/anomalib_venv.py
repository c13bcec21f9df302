"""Create the separate virtual environment the anomalib benchmark runs anomalib in.

anomalib is not a dependency of flawscope: it gets its own venv at ``.bench/anomalib-venv``
(git-ignored), with torch pinned to the version flawscope runs on, so both libraries use the
same torch kernels. pip finds the pinned torch/torchvision wheels on the local disk when they
are there (its configured find-links / extra index), otherwise on the registry.

    python benchmarks/anomalib_venv.py            # create (or reuse) and print its python
    python benchmarks/anomalib_venv.py --recreate
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench" / "anomalib-venv"
ANOMALIB = "anomalib==2.7.0"
PINS = ("torch==2.14.1", "torchvision==0.29.1")
CHECK = "import anomalib, torch, timm, lightning; print(anomalib.__version__, torch.__version__)"


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def is_ready(venv: Path = VENV) -> bool:
    py = venv_python(venv)
    if not py.exists():
        return False
    res = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True)
    return res.returncode == 0 and res.stdout.split()[:1] == [ANOMALIB.split("==")[1]]


def ensure(venv: Path = VENV, recreate: bool = False, base_python: str | None = None) -> Path:
    """The venv's python, after creating the venv and installing anomalib if needed."""
    if recreate and venv.exists():
        shutil.rmtree(venv)
    if is_ready(venv):
        return venv_python(venv)
    t0 = time.perf_counter()
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = base_python or _base_python()
    print(f"creating {venv} with {python} ...", file=sys.stderr)
    subprocess.run([python, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    print(f"installing {ANOMALIB} with {' '.join(PINS)} (a few minutes) ...", file=sys.stderr)
    subprocess.run([*pip, ANOMALIB, *PINS], check=True)
    if not is_ready(venv):
        raise SystemExit(f"{venv}: anomalib does not import after installation")
    print(f"anomalib venv ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return venv_python(venv)


def _base_python() -> str:
    """A Python that is not itself inside a venv (sys._base_executable), same minor version."""
    return getattr(sys, "_base_executable", None) or sys.executable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=VENV)
    ap.add_argument("--recreate", action="store_true")
    ap.add_argument("--python", help="base interpreter for the venv (default: this one's base)")
    args = ap.parse_args()
    print(ensure(args.venv, args.recreate, args.python))


if __name__ == "__main__":
    main()
