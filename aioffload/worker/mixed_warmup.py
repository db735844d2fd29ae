"""Start-up warm-up of the eager mixed step: decode rows beside a prefill chunk, in one forward.

An eager worker (any layer offloaded, or --enforce-eager) runs a step that mixes decode rows with
a prefill chunk through Triton kernel variants no other warm-up reaches: the paged decode kernel
over a row subset (`HAS_ROWS`), with and without split-KV. Compiled on first use, they stalled
the first long prompt arriving beside 16 decoding streams for 0.9-2.0 s on the H200 (BENCHMARKS.md,
fifth session). Two throwaway forwards at start-up compile both: a few decode rows beside a long
chunk (split-KV), then up to 64 decode rows beside a short one (no split).

The sequences sit on the pool's first blocks, which no request owns yet; what they write there is
overwritten before any request reads it (a request reads only positions it wrote).
"""

from __future__ import annotations

from aioffload.worker.inputs import SeqChunk

DECODE_CONTEXT_BLOCKS = 2  # each decode row's context: a position in its second block


def warmup_steps(max_seqs: int, token_budget: int, long_rows: int, block_size: int,
                 num_blocks: int) -> list[list[SeqChunk]]:  # fmt: skip
    """The warm-up steps' chunks: [2 decode rows + a long_rows chunk, up to 64 decode rows + a
    short chunk], each cut to the token budget, max_seqs - 1 decode rows and the pool; a step that
    cannot keep a decode row and a chunk is left out."""
    steps = []
    for rows, chunk in ((2, long_rows), (64, 32)):
        rows = min(rows, max_seqs - 1, token_budget - 1)
        chunk = min(chunk, token_budget - rows)
        need = rows * DECODE_CONTEXT_BLOCKS + -(-chunk // block_size)
        if rows < 1 or chunk < 1 or need > num_blocks:
            continue
        pos = DECODE_CONTEXT_BLOCKS * block_size - 1  # the last slot of its blocks
        chunks = [
            SeqChunk([1], pos, list(range(i * DECODE_CONTEXT_BLOCKS, (i + 1) * DECODE_CONTEXT_BLOCKS)))
            for i in range(rows)
        ]
        first = rows * DECODE_CONTEXT_BLOCKS
        chunks.append(SeqChunk([1] * chunk, 0, list(range(first, first + -(-chunk // block_size)))))
        steps.append(chunks)
    return steps
