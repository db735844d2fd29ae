"""The CUDA-graph replay inputs, filled on the host without numpy (worker/cuda_graphs.GraphInputs).

The fill is plain host work, so it is checked here on CPU buffers; the host cost per row
is measured by scripts/graph_inputs_fill.py (a script, not a timed test).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from aioffload.worker.cuda_graphs import GraphInputs
from aioffload.worker.inputs import SeqChunk

BLOCK, TRASH = 4, 999


def test_fill_writes_rows_padding_and_tables() -> None:
    host = GraphInputs(8, 5, pin_memory=False)
    chunks = [SeqChunk([11], 0, [3]), SeqChunk([22], 9, [7, 8, 2]), SeqChunk([33], 4, (5, 6))]
    host.fill(chunks, 4, BLOCK, TRASH)
    # slot = block_table[p // 4] * 4 + p % 4: p=0 -> 3*4; p=9 -> 2*4+1; p=4 -> 6*4
    assert host.rows[:, :4].tolist() == [[11, 22, 33, 0], [0, 9, 4, 0], [12, 9, 24, TRASH], [1, 10, 5, 1]]
    assert host.rows[:, 4:].tolist() == [[0] * 4] * 4  # beyond the bucket: untouched
    assert host.tables[:3].tolist() == [[3, 0, 0, 0, 0], [7, 8, 2, 0, 0], [5, 6, 0, 0, 0]]


def test_refill_overwrites_previous_step() -> None:
    host = GraphInputs(4, 3, pin_memory=False)
    host.fill([SeqChunk([1], 2, [4]), SeqChunk([2], 5, [6, 7])], 2, BLOCK, TRASH)
    host.fill([SeqChunk([9], 3, [1])], 2, BLOCK, TRASH)  # one sequence left, bucket 2: row 1 is padding
    assert host.rows[:, :2].tolist() == [[9, 0], [3, 0], [7, TRASH], [4, 1]]
    assert host.tables[0].tolist() == [1, 0, 0]


def test_full_bucket_and_full_table() -> None:
    host = GraphInputs(2, 2, pin_memory=False)
    host.fill([SeqChunk([5], 7, [1, 2]), SeqChunk([6], 6, [3, 4])], 2, BLOCK, TRASH)
    assert host.rows.tolist() == [[5, 6], [7, 6], [11, 18], [8, 7]]
    assert host.tables.tolist() == [[1, 2], [3, 4]]


def test_block_table_longer_than_the_graphs_is_refused() -> None:
    host = GraphInputs(2, 2, pin_memory=False)
    with pytest.raises(ValueError, match="3 blocks exceeds the graphs' 2"):
        host.fill([SeqChunk([5], 9, [1, 2, 3])], 1, BLOCK, TRASH)
    assert host.tables.tolist() == [[0, 0], [0, 0]]  # nothing spilled into row 1


def test_fill_works_without_numpy() -> None:
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from aioffload.worker.cuda_graphs import GraphInputs\n"
        "from aioffload.worker.inputs import SeqChunk\n"
        "h = GraphInputs(2, 2, pin_memory=False)\n"
        "h.fill([SeqChunk([5], 1, [3])], 2, 4, 9)\n"
        "print(h.rows.tolist(), h.tables.tolist())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[[5, 0], [1, 0], [13, 9], [2, 1]] [[3, 0], [0, 0]]"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned memory)")
def test_pinned_buffers_fill_the_same() -> None:
    host = GraphInputs(4, 3, pin_memory=True)
    assert host.rows.is_pinned() and host.tables.is_pinned()
    host.fill([SeqChunk([1], 2, [4]), SeqChunk([2], 5, [6, 7])], 4, BLOCK, TRASH)
    assert host.rows.tolist() == [[1, 2, 0, 0], [2, 5, 0, 0], [18, 29, TRASH, TRASH], [3, 6, 1, 1]]
