"""Logits masks: per-request providers of the vocabulary ids allowed next (constrained decoding).

A provider (`LogitsMaskProvider`; `worker/structured.py`'s llguidance `Matcher` is one) writes a
bitmask row: bit j of int32 word i is token id 32 * i + j, 1 = allowed; a row left at -1 allows
every id. Each step the worker fills the rows on the host, right after launching the forward (the
device computes meanwhile), copies them to the device and sets the disallowed logits to -inf after
the penalties and logit_bias and before temperature / top-k / top-p. The engine advances each
provider on every emitted token.

With speculative proposals d_1..d_k a sequence owns k + 1 rows; row j needs the provider's state
after d_1..d_j. `build_masks` walks the proposals (accept d_j if the previous row allows it, fill
the next row), then rolls the provider back: it leaves every provider as it found it. A proposal
its row forbids is rejected by verification (its probability is 0), so the rows after it are never
sampled from and stay unfilled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LogitsMaskProvider(Protocol):
    """One sequence's constraint state; used from one thread at a time (the step's)."""

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next ids into bitmask[row] (host int32 [R, words], contiguous)."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance on an emitted token (one the last filled mask allowed)."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        ...

    @property
    def is_finished(self) -> bool:
        """The constrained output is complete: the engine ends the request ("stop")."""
        ...


# Fills bitmask[row] for each (provider, row); the default calls provider.fill in turn. A grammar
# library with a batch API (llguidance's executor fills on its own threads) plugs in here.
MaskFiller = Callable[[Sequence[tuple[LogitsMaskProvider, int]], torch.Tensor], None]


def fill_each(rows: Sequence[tuple[LogitsMaskProvider, int]], bitmask: torch.Tensor) -> None:
    for provider, row in rows:
        provider.fill(bitmask, row)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(num_rows: int, vocab_size: int, pin: bool = False) -> torch.Tensor:
    """Host int32 [num_rows, words], every bit set (an unfilled row allows every id)."""
    return torch.full((num_rows, bitmask_words(vocab_size)), -1, dtype=torch.int32, pin_memory=pin)


def allows(bitmask: torch.Tensor, row: int, token_id: int) -> bool:
    """Host check: does bitmask[row] allow token_id?"""
    return bool((int(bitmask[row, token_id >> 5]) >> (token_id & 31)) & 1)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [R, words] -> bool [R, vocab_size] of allowed ids (on bitmask's device)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts).bitwise_and_(1)  # [R, words, 32]; bit j of word i = id 32 i + j
    return bits.flatten(1)[:, :vocab_size].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """In place: logits[rows[m], v] = -inf where bit v of bitmask[m] is 0.
    logits: [S, V] float; bitmask: [M, words] int32 on logits' device; rows: [M] int64, distinct
    (None: M == S, row m masks logits row m)."""
    allowed = unpack_bitmask(bitmask, logits.shape[-1])  # [M, V]
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill_(~allowed, float("-inf"))


def build_masks(
    seqs: Sequence[tuple[LogitsMaskProvider, int, Sequence[int]]],
    vocab_size: int,
    fill: MaskFiller = fill_each,
    pin: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Masks for the rows of each (provider, first logits row, proposals verified after it).

    -> (host bitmask [M, words], the logits row of each bitmask row [M]). Providers are left in the
    state they were found in. Rows are filled level by level (every sequence's row j, then its
    proposal j + 1 accepted), so a batch `fill` sees as many rows at once as possible.
    """
    bitmask = allocate_bitmask(sum(1 + len(p) for _, _, p in seqs), vocab_size, pin)
    rows: list[int] = []
    slot = [0] * len(seqs)  # bitmask row of each sequence's latest filled logits row
    level: list[tuple[LogitsMaskProvider, int]] = []
    for i, (provider, first, _) in enumerate(seqs):
        slot[i] = len(rows)
        level.append((provider, slot[i]))
        rows.append(first)
    fill(level, bitmask)
    walked = [0] * len(seqs)
    live = list(range(len(seqs)))
    j = 0
    while live:
        level, nxt = [], []
        for i in live:
            provider, first, proposals = seqs[i]
            if j < len(proposals) and allows(bitmask, slot[i], proposals[j]):
                provider.accept(proposals[j])
                walked[i] += 1
                slot[i] = len(rows)
                level.append((provider, slot[i]))
                rows.append(first + j + 1)
                nxt.append(i)
        if level:
            fill(level, bitmask)
        live, j = nxt, j + 1
    for (provider, _, _), n in zip(seqs, walked):
        if n:
            provider.rollback(n)
    return bitmask[: len(rows)], rows
