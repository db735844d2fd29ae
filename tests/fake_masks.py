"""Fake logits-mask providers (worker/masks.py's protocol) for the worker and engine tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _set_only(bitmask: torch.Tensor, row: int, ids: Sequence[int]) -> None:
    bitmask[row] = 0
    for t in ids:
        word = int(bitmask[row, t >> 5]) | (1 << (t & 31))
        bitmask[row, t >> 5] = word - (1 << 32) if word >= 1 << 31 else word  # int32 two's complement


class EvenOnly:
    """Allows only even token ids, forever."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.accepted: list[int] = []

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        _set_only(bitmask, row, range(0, self.vocab_size, 2))

    def accept(self, token_id: int) -> None:
        assert token_id % 2 == 0, f"odd token {token_id} accepted"
        self.accepted.append(token_id)

    def rollback(self, num_tokens: int) -> None:
        assert 0 <= num_tokens <= len(self.accepted)
        del self.accepted[len(self.accepted) - num_tokens :]

    @property
    def is_finished(self) -> bool:
        return False


class Forced:
    """Allows exactly `sequence[i]` as the i-th token, then only `eos`; finished once it is all out
    (with finish_on_eos, only after eos itself was accepted)."""

    def __init__(self, sequence: Sequence[int], eos: int, finish_on_eos: bool = False) -> None:
        self.sequence = list(sequence)
        self.eos = eos
        self.finish_on_eos = finish_on_eos
        self.accepted: list[int] = []
        self.fills = 0

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.fills += 1
        i = len(self.accepted)
        _set_only(bitmask, row, [self.sequence[i]] if i < len(self.sequence) else [self.eos])

    def accept(self, token_id: int) -> None:
        i = len(self.accepted)
        want = self.sequence[i] if i < len(self.sequence) else self.eos
        assert token_id == want, f"token {token_id} at {i}, the mask allowed only {want}"
        self.accepted.append(token_id)

    def rollback(self, num_tokens: int) -> None:
        assert 0 <= num_tokens <= len(self.accepted)
        del self.accepted[len(self.accepted) - num_tokens :]

    @property
    def is_finished(self) -> bool:
        return len(self.accepted) >= len(self.sequence) + (1 if self.finish_on_eos else 0)
