"""Turn one step's sequences into the model's flat input tensors.

Built as plain host lists (long chunks as host tensors), turned into tensors once, and copied to
the device with one non-blocking copy per tensor (from pinned memory on CUDA).

Only the logits rows (each chunk's last `num_logits`) feed anything past the last layer's K/V,
so a step whose other rows are most of it also carries the logits rows' own metadata
(`meta.logits_rows`): the model's last layer writes every row's K/V and computes attention, the
o projection and the MLP for those rows alone. A lone 32000-token prompt on the H200 gains ~1/32
of its prefill (BENCHMARKS.md, eighth session); the logits are the same computation.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Sequence
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
    chunks: Sequence[SeqChunk],
    block_size: int,
    device: torch.device,
    dense_min_rows: int | None = None,
    prune_last_layer: bool = True,
) -> StepInputs:
    """`dense_min_rows`: chunks of at least this many rows go to the backend's dense path
    (attention/dense_prefill.py, meta.dense_seqs) instead of the Triton tiles; None: none do.
    `prune_last_layer`: give the metadata of the logits rows alone (meta.logits_rows) when they are at
    most half the rows, so the model ends the other rows after the last layer's K/V."""
    rows = _Rows()
    qlens: list[int] = []
    slens: list[int] = []
    last: list[int] = []
    dense: list[tuple[int, int, int, int]] = []  # (sequence, first row, rows, first position)
    width = max(len(c.block_table) for c in chunks)
    tables = [list(c.block_table) + [0] * (width - len(c.block_table)) for c in chunks]
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        if dense_min_rows is not None and n > 1 and n >= dense_min_rows:
            dense.append((s, rows.count, n, c.start))
        rows.add(s, c, block_size)
        last.extend(range(rows.count - c.num_logits, rows.count))
        qlens.append(n)
        slens.append(c.start + n)
    pin = device.type == "cuda"

    def t(data: list[int] | list[list[int]] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        host = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
        if pin:
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    ids, pos, slots, row_seq, row_ctx = rows.tensors()
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
    if prune_last_layer and 2 * len(last) <= len(ids) and not any(c.prompt_targets for c in chunks):
        meta.logits_rows = _logits_rows(chunks, block_size, meta.block_tables, t)
    return StepInputs(t(ids, torch.int64), t(pos, torch.int64), meta)


LONG_CHUNK = 256  # rows from which a chunk's positions and slots come from tensor ops, not a Python loop


class _Rows:
    """A step's per-row inputs in row order: short chunks as Python lists, long ones as host tensors
    (a 32k-token chunk's loop took ~23 ms of host time before the GPU could start)."""

    def __init__(self) -> None:
        self.count = 0
        self._parts: list[tuple[torch.Tensor, ...]] = []
        self._lists: tuple[list[int], ...] = ([], [], [], [], [])

    def add(self, s: int, c: SeqChunk, block_size: int) -> None:
        n = len(c.token_ids)
        self.count += n
        if n < LONG_CHUNK:
            ids, pos, slots, seq, ctx = self._lists
            ids.extend(c.token_ids)
            for p in range(c.start, c.start + n):
                pos.append(p)
                slots.append(c.block_table[p // block_size] * block_size + p % block_size)
                seq.append(s)
                ctx.append(p + 1)
            return
        self._flush()
        p = torch.arange(c.start, c.start + n)
        table = torch.tensor(c.block_table[: (c.start + n - 1) // block_size + 1], dtype=torch.int64)
        slots = table[p // block_size] * block_size + p % block_size
        ids = torch.frombuffer(array.array("q", c.token_ids), dtype=torch.int64)  # ~3x torch.tensor's speed
        self._parts.append((ids, p, slots, torch.full((n,), s), p + 1))

    def _flush(self) -> None:
        if self._lists[0]:
            self._parts.append(tuple(torch.tensor(x, dtype=torch.int64) for x in self._lists))
            self._lists = ([], [], [], [], [])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(token ids, positions, cache slots, row sequence, row context), int64 [T] each."""
        self._flush()
        if len(self._parts) == 1:
            return self._parts[0]
        return tuple(torch.cat(x) for x in zip(*self._parts))


def _logits_rows(
    chunks: Sequence[SeqChunk], block_size: int, block_tables: torch.Tensor, t: Callable[..., torch.Tensor]
) -> AttentionMetadata:
    """The attention metadata of the logits rows alone (each chunk's last num_logits rows, in order):
    what the model's last layer attends with once the other rows have written their K/V."""
    qlens = [c.num_logits for c in chunks]
    starts = [c.start + len(c.token_ids) - c.num_logits for c in chunks]
    rows = _Rows()
    for s, (c, start, k) in enumerate(zip(chunks, starts, qlens)):
        rows.add(s, SeqChunk(c.token_ids[len(c.token_ids) - k :], start, c.block_table), block_size)
    _, _, slots, seq, ctx = rows.tensors()
    meta = AttentionMetadata(
        slot_mapping=t(slots, torch.int64),
        block_tables=block_tables,
        row_seq=t(seq, torch.int32),
        row_ctx=t(ctx, torch.int32),
        last_token_idx=t(list(range(rows.count)), torch.int64),
        query_lens=qlens,
        seq_lens_host=[c.start + len(c.token_ids) for c in chunks],
        decode_only=all(k == 1 for k in qlens),
    )
    if not meta.decode_only:
        tiles, decode_rows = plan_rows(qlens, starts)
        meta.prefill_tiles = t(tiles, torch.int32).reshape(-1, 4)
        meta.decode_rows = t(decode_rows, torch.int32)
    return meta
