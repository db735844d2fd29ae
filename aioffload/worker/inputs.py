"""Turn one step's sequences into the model's flat input tensors.

Built as plain host lists, turned into tensors once, and copied to the device with one
non-blocking copy per tensor (from pinned memory on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aioffload.attention.backends import AttentionMetadata
from aioffload.attention.tiles import plan_rows


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: tokens at positions [start, start + len(token_ids)).

    The model returns logits for the chunk's last `num_logits` positions: 1 for a prefill chunk or
    a decode token; k + 1 when the chunk ends in k proposed tokens to verify.

    Prompt logprobs: a prefill chunk of a request that asks for them has num_logits = its length and
    `prompt_targets` = the prompt tokens its rows predict (row i: the token at start + i + 1), all n of
    them mid-prompt, n - 1 in the prompt's last chunk. It carries no proposals; its last row is
    sampled as usual.
    """

    token_ids: Sequence[int]
    start: int  # = num_computed_tokens
    block_table: Sequence[int]
    num_logits: int = 1
    prompt_targets: Sequence[int] = ()

    @property
    def num_proposed(self) -> int:
        """Proposed tokens the chunk ends in (its last num_proposed + 1 rows are sampled)."""
        return 0 if self.prompt_targets else self.num_logits - 1


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata


def build_inputs(
    chunks: Sequence[SeqChunk], block_size: int, device: torch.device, dense_min_rows: int | None = None
) -> StepInputs:
    """`dense_min_rows`: chunks of at least this many rows go to the backend's dense path
    (attention/dense_prefill.py, meta.dense_seqs) instead of the Triton tiles; None: none do."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    row_seq: list[int] = []
    row_ctx: list[int] = []
    last: list[int] = []
    qlens: list[int] = []
    slens: list[int] = []
    dense: list[tuple[int, int, int, int]] = []  # (sequence, first row, rows, first position)
    width = max(len(c.block_table) for c in chunks)
    tables = [list(c.block_table) + [0] * (width - len(c.block_table)) for c in chunks]
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        if dense_min_rows is not None and n > 1 and n >= dense_min_rows:
            dense.append((s, len(ids), n, c.start))
        ids.extend(c.token_ids)
        for p in range(c.start, c.start + n):
            pos.append(p)
            slots.append(c.block_table[p // block_size] * block_size + p % block_size)
            row_seq.append(s)
            row_ctx.append(p + 1)
        last.extend(range(len(ids) - c.num_logits, len(ids)))
        qlens.append(n)
        slens.append(c.start + n)
    pin = device.type == "cuda"

    def t(data: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(data, dtype=dtype)
        if pin:
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    meta = AttentionMetadata(
        slot_mapping=t(slots, torch.int64),
        block_tables=t(tables, torch.int32),
        row_seq=t(row_seq, torch.int32),
        row_ctx=t(row_ctx, torch.int32),
        last_token_idx=t(last, torch.int64),
        query_lens=qlens,
        seq_lens_host=slens,
        decode_only=len(last) == len(ids) and all(n == 1 for n in qlens),  # one token and logits row each
    )
    if any(n > 1 for n in qlens):  # a prefill chunk: the tiled kernel takes it (decode-only steps need nothing)
        tiles, decode_rows = plan_rows(qlens, [c.start for c in chunks])
        if dense:
            meta.dense_seqs = dense
            taken = {s for s, *_ in dense}
            tiles = [tile for tile in tiles if tile[0] not in taken]
        meta.prefill_tiles = t(tiles, torch.int32).reshape(-1, 4)
        meta.decode_rows = t(decode_rows, torch.int32)
    return StepInputs(t(ids, torch.int64), t(pos, torch.int64), meta)
