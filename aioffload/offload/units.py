"""How plans and their errors write byte counts, durations and layer spans."""

from __future__ import annotations

import math
from collections.abc import Sequence


def duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def span(layers: Sequence[int]) -> str:
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def gb(n: float) -> str:
    """GB with two decimals from 0.1 GB up; smaller figures in MB, kB or bytes (never "0.00 GB")."""
    if n == 0:
        return "0 GB"
    return f"{n / 1e9:.2f} GB" if n >= 0.1e9 else size(n)


def size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n:.0f} B"


def round_up_2(x: float) -> float:
    """x rounded up to two significant digits (0.3394 -> 0.34, 123.4 -> 130)."""
    if x <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(round(x / scale, 9)) * scale
