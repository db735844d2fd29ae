"""How a step's query rows are split between the two Triton kernels (plain Python, no torch).

A sequence with more than one query row this step (a prefill chunk) is cut into query tiles
of `PREFILL_TILE` rows for the tiled prefill kernel; a one-row sequence (a decode token) is
a row of the split-KV decode kernel. Built on the host with the rest of the step inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

PREFILL_TILE = 128  # query rows per prefill-kernel program: the kernel's BLOCK_M (two warpgroups on Hopper)


def plan_rows(
    query_lens: Sequence[int], starts: Sequence[int], tile: int = PREFILL_TILE
) -> tuple[list[list[int]], list[int]]:
    """(prefill tiles, decode rows) of a step whose sequences come in row order.

    Sequence s has query_lens[s] rows at positions starts[s] .. starts[s] + query_lens[s] - 1.
    A tile is [seq, first row, rows (<= tile), position of its first row]. Tiles come
    heaviest first (most keys to read), so the last wave of programs is a short one.
    """
    tiles: list[list[int]] = []
    decode: list[int] = []
    row = 0
    for s, (n, start) in enumerate(zip(query_lens, starts, strict=True)):
        if n == 1:
            decode.append(row)
        else:
            tiles.extend([s, row + o, min(tile, n - o), start + o] for o in range(0, n, tile))
        row += n
    tiles.sort(key=lambda t: -(t[2] + t[3]))  # keys the tile's last row sees
    return tiles, decode
