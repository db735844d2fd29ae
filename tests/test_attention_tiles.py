"""How a step's rows are split between the prefill and decode kernels (tiles.plan_rows), and the
metadata build_inputs makes of it. Plain Python and torch on the CPU; no Triton."""

from __future__ import annotations

import torch

from aioffload.attention.tiles import PREFILL_TILE, plan_rows
from aioffload.worker.inputs import SeqChunk, build_inputs


def test_plan_rows_cuts_chunks_into_tiles_heaviest_first() -> None:
    # rows: seq 0 = 0..129 (fresh 130), seq 1 = 130 (decode at 500), seq 2 = 131..134 (4 after a 40-token prefix)
    tiles, decode = plan_rows([130, 1, 4], [0, 500, 40], tile=64)
    assert decode == [130]
    assert tiles == [
        [0, 128, 2, 128],  # the tail tile of the prompt: its last row sees 130 keys
        [0, 64, 64, 64],  # 128 keys
        [0, 0, 64, 0],  # 64 keys
        [2, 131, 4, 40],  # 44 keys
    ]


def test_plan_rows_covers_every_prefill_row_once() -> None:
    qlens, starts = [1, 200, 65, 1, 1, 2, 64], [9, 0, 300, 0, 77, 5, 1000]
    tiles, decode = plan_rows(qlens, starts, tile=PREFILL_TILE)
    rows = sorted(r for _, first, n, _ in tiles for r in range(first, first + n))
    assert sorted(rows + decode) == list(range(sum(qlens)))
    assert all(1 <= n <= PREFILL_TILE for _, _, n, _ in tiles)
    row_start = [sum(qlens[:s]) for s in range(len(qlens))]
    for seq, first, _, pos in tiles:  # a tile's first row sits at its own position
        assert pos == starts[seq] + first - row_start[seq]
    work = [n + pos for _, _, n, pos in tiles]
    assert work == sorted(work, reverse=True)


def test_build_inputs_adds_tiles_only_to_steps_with_a_prefill_chunk() -> None:
    cpu = torch.device("cpu")
    decode_only = build_inputs([SeqChunk([5], 7, [0, 1]), SeqChunk([6], 2, [2])], 4, cpu)
    assert decode_only.meta.prefill_tiles is None and decode_only.meta.decode_rows is None
    mixed = build_inputs([SeqChunk([5], 7, [0, 1]), SeqChunk([1, 2, 3], 2, [2, 3])], 4, cpu)
    assert mixed.meta.prefill_tiles.dtype == torch.int32
    assert mixed.meta.prefill_tiles.tolist() == [[1, 1, 3, 2]]
    assert mixed.meta.decode_rows.tolist() == [0]
    prefill_only = build_inputs([SeqChunk([1, 2], 0, [4])], 4, cpu)
    assert prefill_only.meta.decode_rows.tolist() == [] and prefill_only.meta.prefill_tiles.shape == (1, 4)
