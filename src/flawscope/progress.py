"""Progress output: a tqdm bar on a terminal, plain lines anywhere else.

A bar redraws itself with carriage returns; written to a log file, a pipe or CI output that is
hundreds of frames. When stderr is not a terminal, :func:`progress_bar` therefore returns a
:class:`LineProgress`, which writes plain lines: one when a phase (an epoch, feature
extraction, ...) ends, and on long phases one per quarter of the work at most every
``interval`` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


class LineProgress:
    """The part of tqdm's interface flawscope uses, as plain log lines."""

    def __init__(
        self, total: int | None, desc: str, file: TextIO | None = None, unit: str = "img",
        interval: float = 5.0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.unit = unit
        self.interval = interval
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.perf_counter()
        self._quarter = 0
        self._closed = False

    def _write(self, text: str) -> None:
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {text}{extra}", file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total:
            return
        quarter = min(4 * self.n // self.total, 4)
        now = time.perf_counter()
        if 0 < quarter < 4 and quarter > self._quarter and now - self._last >= self.interval:
            elapsed = now - self._start
            left = elapsed * (self.total - self.n) / self.n
            self._write(f"{25 * quarter}% ({self.n}/{self.total} {self.unit}, "
                        f"{_duration(elapsed)}, about {_duration(left)} left)")
            self._last = now
        self._quarter = max(self._quarter, quarter)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        seconds = time.perf_counter() - self._start
        rate = f", {self.n / seconds:.1f} {self.unit}/s" if seconds > 0 and self.n else ""
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        self._write(f"done, {count} {self.unit} in {seconds:.1f} s{rate}")

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    """12.3 -> "12 s"; 754 -> "12 min 34 s"; 4000 -> "1 h 07 min"."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int, desc: str, enabled: bool = True, leave: bool = False, unit: str = "img",
) -> tqdm | LineProgress:
    """A progress display on stderr: a tqdm bar on a terminal (or in a notebook), plain lines
    (:class:`LineProgress`) when stderr is a file or pipe, nothing when not ``enabled``."""
    stream = sys.stderr
    if enabled and not _is_terminal(stream) and "ipykernel" not in sys.modules:
        return LineProgress(total, desc, stream, unit)
    if enabled and "ipykernel" in sys.modules:
        from tqdm.auto import tqdm as auto_tqdm

        return auto_tqdm(total=total, desc=desc, leave=leave, unit=unit)
    return tqdm(total=total, desc=desc, disable=not enabled, leave=leave, file=stream,
                dynamic_ncols=True, unit=unit)
