"""Shared helpers of the benchmark scripts: data location, tables, JSON results."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def data_root() -> Path:
    """Real data folder: ``$FLAWSCOPE_DATA`` or ``../shared/data`` beside the repository."""
    root = Path(os.environ.get("FLAWSCOPE_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        sys.exit(f"real data not found at {root}: set FLAWSCOPE_DATA")
    return root


def peak_rss_mb() -> float:
    """Peak RSS of this process, MiB: ``VmHWM`` (``ru_maxrss`` survives ``execve`` and would
    start at the parent's RSS at fork time), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def write_json(path: str | Path | None, payload: Any) -> None:
    if not path:
        return
    from flawscope.io import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    print(f"results written to {path}", file=sys.stderr)
