"""A dependency-free progress bar for long loads, drawn on stderr.

On a terminal the bar is redrawn in place (`\\r`); anywhere else (a log file, a pipe, a
service manager's journal) it writes one line when the load starts and one when it ends,
so a log never fills with carriage-return frames.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Redraws at most every 0.2 s on a terminal; silent for totals under `min_total` (tiny models)."""

    def __init__(
        self,
        label: str,
        total: float,
        unit_scale: float = 1.0,
        unit: str = "",
        min_total: float = 200e6,
        stream: TextIO | None = None,
    ) -> None:
        self.label, self.total, self.scale, self.unit = label, total, unit_scale, unit
        self.done = 0.0
        self.stream = stream or sys.stderr
        self.enabled = total >= min_total
        self.terminal = is_terminal(self.stream)
        self._start = time.perf_counter()
        self._last_draw = 0.0
        if self.enabled and not self.terminal:
            self._line(f"{label}: {self._amount(total)} ...")

    def advance(self, amount: float) -> None:
        self.done += amount
        if not (self.enabled and self.terminal):
            return
        now = time.perf_counter()
        if now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw(now)

    def render(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        rate = self.done / max(now - self._start, 1e-9) / self.scale
        return (
            f"{self.label} [{bar}] {self.done / self.scale:.2f}/{self.total / self.scale:.2f} {self.unit}"
            f" {rate:.2f} {self.unit}/s"
        )

    def _amount(self, n: float) -> str:
        return f"{n / self.scale:.2f} {self.unit}".rstrip()

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.render(now))
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.terminal:
            self._draw(now)
            self.stream.write("\n")
            self.stream.flush()
            return
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed / self.scale
        self._line(f"{self.label}: {self._amount(self.done)} in {elapsed:.1f} s ({rate:.2f} {self.unit}/s)")
