"""Prompt lookup (engine/ngram.py): what it proposes, on token boundaries, longest suffix first."""

from __future__ import annotations

import random

from aioffload.engine.ngram import propose_ngram


def naive(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The definition, spelled out: latest earlier occurrence of the longest matching suffix."""
    for n in range(n_max, n_min - 1, -1):
        if n >= len(tokens):
            continue
        tail = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i : i + n] == tail:
                return tokens[i + n : i + n + k]
    return []


def test_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3], 3, 1, 3) == [4, 1, 2]
    assert propose_ngram([1, 2, 3, 4, 1, 2], 5, 2, 3) == [3, 4, 1, 2]  # runs into the tail: what there is
    assert propose_ngram([7, 1, 9, 1, 8, 1], 1, 1, 1) == [8]  # the latest of several matches
    assert propose_ngram([5, 6, 7], 2, 1, 2) == []  # nothing repeats
    assert propose_ngram([1, 2, 1, 2], 0, 1, 2) == []  # k = 0


def test_longest_suffix_wins_over_a_later_short_match() -> None:
    # Tail [4, 5]: the 2-gram occurred at 0 (followed by 6); a later 1-gram [5] is followed by 9.
    assert propose_ngram([4, 5, 6, 5, 9, 4, 5], 1, 1, 2) == [6]
    assert propose_ngram([4, 5, 6, 5, 9, 4, 5], 1, 1, 1) == [9]
    assert propose_ngram([4, 5, 6, 5, 9, 3, 5], 2, 2, 2) == []  # no 2-gram match, and n_min = 2


def test_matches_stay_on_token_boundaries() -> None:
    # 256 and 1 share bytes with a misaligned reading of [1, 0, 0, 1]; ids past 2^16 too.
    assert propose_ngram([256, 1, 0, 0, 1], 2, 1, 1) == [0, 0]
    assert propose_ngram([65537, 1, 9, 1], 2, 1, 1) == [9, 1]
    assert propose_ngram([1 << 24, 0, 1, 1 << 24], 1, 1, 1) == [0]


def test_agrees_with_the_definition_on_random_sequences() -> None:
    rng = random.Random(3)
    for _ in range(500):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        k, n_min = rng.randrange(1, 6), rng.randrange(1, 3)
        n_max = n_min + rng.randrange(3)
        assert propose_ngram(tokens, k, n_min, n_max) == naive(tokens, k, n_min, n_max), (tokens, k, n_min, n_max)
