"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the sequence's tail.

Summaries, code edits and quotes repeat spans of their prompt, so when the last n tokens appeared
before, what came after them then is a good guess for what comes now. No model, no tensors.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence


def propose_ngram(token_ids: Sequence[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens, trying n from
    n_max down to n_min; [] when no suffix of those lengths occurred before (or k < 1)."""
    length = len(token_ids)
    if k < 1 or length < n_min + 1:
        return []
    # One C-speed byte search per n: every token as w bytes, matches kept only on token boundaries.
    tokens = array("I", token_ids)
    data, w = tokens.tobytes(), tokens.itemsize
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = data[w * (length - n) :]
        # Search before the last token, so the tail itself never matches and a match has a follower.
        i = data.rfind(pattern, 0, w * (length - 1))
        while i > 0 and i % w:
            i = data.rfind(pattern, 0, i + len(pattern) - 1)
        if i >= 0 and i % w == 0:
            start = i // w + n
            return list(token_ids[start : start + k])
    return []
