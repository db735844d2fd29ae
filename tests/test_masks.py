"""Logits masks: bitmask layout, applying them, and the walk over speculative proposals."""

from __future__ import annotations

import torch

from aioffload.worker.masks import (
    LogitsMaskProvider,
    allocate_bitmask,
    allows,
    apply_bitmask,
    bitmask_words,
    build_masks,
    unpack_bitmask,
)
from tests.fake_masks import EvenOnly, Forced

V = 70  # not a multiple of 32: the last word is partial


def test_fakes_are_providers() -> None:
    assert isinstance(EvenOnly(V), LogitsMaskProvider) and isinstance(Forced([1], 0), LogitsMaskProvider)


def test_bitmask_layout_bit_j_of_word_i_is_token_32i_plus_j() -> None:
    assert bitmask_words(V) == 3 and bitmask_words(64) == 2
    m = allocate_bitmask(2, V)
    assert m.dtype == torch.int32 and m.shape == (2, 3) and unpack_bitmask(m, V).all()
    m[1] = 0
    m[1, 1] = 1 << 3  # token 35
    m[1, 0] = -(1 << 31)  # bit 31 of word 0: token 31 (the sign bit)
    allowed = unpack_bitmask(m, V)
    assert allowed[1].nonzero().flatten().tolist() == [31, 35]
    assert allows(m, 1, 35) and allows(m, 1, 31) and not allows(m, 1, 34) and allows(m, 0, 69)


def test_apply_bitmask_sets_exactly_the_disallowed_ids_to_minus_inf() -> None:
    logits = torch.randn(3, V)
    before = logits.clone()
    m = allocate_bitmask(1, V)
    EvenOnly(V).fill(m, 0)
    apply_bitmask(logits, m, torch.tensor([2]))
    assert torch.equal(logits[:2], before[:2])
    assert torch.equal(logits[2, 0::2], before[2, 0::2])
    assert (logits[2, 1::2] == float("-inf")).all()


def test_build_masks_one_row_per_plain_sequence() -> None:
    a, b = EvenOnly(V), Forced([7, 8], eos=1)
    bitmask, rows = build_masks([(a, 0, []), (b, 3, [])], V)
    assert rows == [0, 3]
    allowed = unpack_bitmask(bitmask, V)
    assert allowed[0].nonzero().flatten().tolist() == list(range(0, V, 2))
    assert allowed[1].nonzero().flatten().tolist() == [7]
    assert a.accepted == [] and b.accepted == []


def test_build_masks_walks_allowed_proposals_and_leaves_providers_as_found() -> None:
    forced = Forced([5, 6, 7, 9], eos=1)
    forced.accept(5)  # one token already out: the next allowed are 6, 7, 9
    even = EvenOnly(V)
    calls: list[list[int]] = []

    def fill(pairs, bitmask):  # noqa: ANN001, ANN202 -- a batch filler sees each level at once
        calls.append([row for _, row in pairs])
        for p, row in pairs:
            p.fill(bitmask, row)

    # forced: proposals 6, 7, 4 at logits rows 10.. (4 is not allowed after 6, 7: rows 10, 11, 12 only)
    # even: proposals 2, 3 at rows 0..; 3 is odd, so only rows 0, 1
    bitmask, rows = build_masks([(forced, 10, [6, 7, 4]), (even, 0, [2, 3])], V, fill)
    assert rows == [10, 0, 11, 1, 12]
    allowed = unpack_bitmask(bitmask, V)
    assert [allowed[i].nonzero().flatten().tolist() for i in (0, 2, 4)] == [[6], [7], [9]]
    assert allowed[1].nonzero().flatten().tolist() == allowed[3].nonzero().flatten().tolist() == list(range(0, V, 2))
    assert calls == [[0, 1], [2, 3], [4]]
    assert forced.accepted == [5] and even.accepted == []  # rolled back
