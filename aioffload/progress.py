"""A dependency-free progress bar for long loads, drawn on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redraws at most every 0.2 s; silent for totals under `min_total` (tiny models)."""

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
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def advance(self, amount: float) -> None:
        self.done += amount
        now = time.perf_counter()
        if self.enabled and now - self._last_draw >= 0.2:
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

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.render(now))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
