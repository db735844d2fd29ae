"""Logits processors applied on the device to the rows that ask: penalties, logit_bias, min_tokens.

Definitions (logit l of token t in a row, before temperature / top-k / top-p):
- repetition_penalty p (HF / vLLM), t among the prompt or the outputs: l / p if l > 0, else l * p;
- frequency_penalty f, presence_penalty r (OpenAI), c = count of t among the outputs:
  l - f * c - r * (c > 0);
- logit_bias b_t: l + b_t;
- min_tokens m: while fewer than m tokens are out, eos and stop_token_ids get -inf.
Applied in that order. Rows are processed in one batch per processor; a processor no row uses
costs nothing, and a step with none does not come here at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aioffload.worker.sampling import SamplingParams


@dataclass(frozen=True)
class RowHistory:
    """One logits row to process: what its request asked and what it has emitted before this row."""

    row: int  # index into the logits
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # outputs before the token this row samples (proposals included)
    eos_token_ids: Sequence[int] = ()


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def _flat(rows: Sequence[RowHistory], tokens_of) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """(i, token) pairs over rows, i the row's index in `rows`: two flat lists."""
    idx: list[int] = []
    toks: list[int] = []
    for i, r in enumerate(rows):
        t = tokens_of(r)
        idx.extend([i] * len(t))
        toks.extend(t)
    return idx, toks


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowHistory]) -> None:
    """In place on logits [R, V] float32 (rows not listed are untouched)."""
    dev, vocab = logits.device, logits.shape[-1]
    rep = [r for r in rows if r.params.repetition_penalty != 1.0]
    if rep:
        at = _ids([r.row for r in rep], dev)
        i, t = _flat(rep, lambda r: [*r.prompt_token_ids, *r.output_token_ids])
        seen = torch.zeros(len(rep), vocab, dtype=torch.bool, device=dev)  # [Rr, V]
        seen[_ids(i, dev), _ids(t, dev)] = True
        pen = torch.tensor([r.params.repetition_penalty for r in rep], dtype=logits.dtype).to(dev)[:, None]
        sub = logits[at]  # [Rr, V]
        logits[at] = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
    freq = [r for r in rows if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
    if freq:
        at = _ids([r.row for r in freq], dev)
        i, t = _flat(freq, lambda r: r.output_token_ids)
        counts = torch.zeros(len(freq), vocab, dtype=logits.dtype, device=dev)  # [Rf, V]
        counts.index_put_((_ids(i, dev), _ids(t, dev)), torch.ones(len(t), dtype=logits.dtype, device=dev),
                          accumulate=True)  # fmt: skip
        fp = torch.tensor([[r.params.frequency_penalty, r.params.presence_penalty] for r in freq],
                          dtype=logits.dtype).to(dev)  # [Rf, 2]  # fmt: skip
        logits[at] = logits[at] - fp[:, :1] * counts - fp[:, 1:] * (counts > 0).to(logits.dtype)
    bias = [r for r in rows if r.params.logit_bias]
    if bias:
        at, toks, vals = [], [], []
        for r in bias:
            for tok, b in r.params.logit_bias:
                at.append(r.row)
                toks.append(tok)
                vals.append(b)
        logits.index_put_((_ids(at, dev), _ids(toks, dev)), torch.tensor(vals, dtype=logits.dtype).to(dev),
                          accumulate=True)  # token ids are distinct within a row: one add each  # fmt: skip
    early = [r for r in rows if len(r.output_token_ids) < r.params.min_tokens]
    if early:
        i, t = _flat(early, _stop_ids)
        if t:
            at = _ids([early[k].row for k in i], dev)
            logits[at, _ids(t, dev)] = float("-inf")


def _stop_ids(r: RowHistory) -> list[int]:
    """The ids min_tokens holds back: the request's stop token ids, and eos unless eos is ignored."""
    ids = set(r.params.stop_token_ids)
    if not r.params.ignore_eos:
        ids.update(r.eos_token_ids)
    return sorted(ids)
