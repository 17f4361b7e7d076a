"""A progress bar on stderr, shown only when stderr is a terminal (or forced).

The bar redraws its line in place (``\\r``), so until it is closed the terminal's cursor
sits in the middle of a line. That is a fact about the stream, not about one bar: an
error or an interrupt must end the line before printing, whichever bar drew it, so the
open lines are kept per stream and ``end_line`` ends one.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .textsafe import printable

REDRAW_SECONDS = 0.1  # at most ten redraws a second, and one at least every 0.1 s of calls
_WIDTH = 30
_open_lines: dict[int, TextIO] = {}  # id(stream) -> stream whose last line a bar left open


def human(n: float) -> str:
    """``512 B``, ``1.5 KiB`` ... ``2.0 TiB``; larger values stay in TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def end_line(stream: TextIO | None = None) -> None:
    """End the line a progress bar left open on ``stream`` (stderr by default), if any."""
    stream = stream or sys.stderr
    if _open_lines.pop(id(stream), None) is not None:
        stream.write("\n")
        stream.flush()


class ProgressBar:
    """Call with (done, total) bytes; ``close()`` (or leaving a ``with``) ends the line.

    Shows the share done, bytes done of the total, the rate and the time left, e.g.
    ``extract pc.ram [#########.....]  31.0%  1.2 GiB of 4.0 GiB  850.3 MiB/s  0:03 left``.
    """

    def __init__(self, label: str, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = printable(label)  # it may hold a block name
        self._start = time.monotonic()
        self._last: float | None = None
        self._width = 0  # of the last line drawn, to blank what a shorter one leaves

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._last is not None and now - self._last < REDRAW_SECONDS and done < total:
            return
        self._last = now
        frac = min(done / total, 1.0) if total > 0 else 1.0
        fill = int(frac * _WIDTH)
        elapsed = now - self._start
        line = f"{self.label} [{'#' * fill}{'.' * (_WIDTH - fill)}] {frac:6.1%}  {human(done)} of {human(total)}"
        if elapsed >= 0.5 and done > 0:  # a rate from the first instants says nothing
            rate = done / elapsed
            line += f"  {human(rate)}/s"
            if done < total:
                line += f"  {_duration((total - done) / rate)} left"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)
        _open_lines[id(self.stream)] = self.stream

    def close(self) -> None:
        end_line(self.stream)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
