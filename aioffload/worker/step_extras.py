"""The sampling side of a step whose requests ask for more than plain sampling.

`Worker.execute` comes here only when the engine passes `extras` (some request of the step uses
logprobs, prompt logprobs, a penalty, logit_bias, min_tokens or a logits mask); otherwise it keeps
its plain path (an argmax for an all-greedy batch). Order, for the whole batch at once:

    masks filled on the host (the device is still computing the forward)
    prompt logprobs and sampled-token logprobs of the raw logits
    penalties, logit_bias, min_tokens (worker/penalties.py), then the masks, on the sampled rows
    sampling or speculative verification (unchanged), then the logprobs of the emitted tokens
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aioffload.worker.inputs import SeqChunk
from aioffload.worker.logprobs import PendingLogprobs, TokenLogprob
from aioffload.worker.masks import LogitsMaskProvider, MaskFiller, apply_bitmask, build_masks, fill_each
from aioffload.worker.outputs import StepOutput
from aioffload.worker.penalties import RowHistory, apply_penalties
from aioffload.worker.rejection import verify
from aioffload.worker.sampling import SamplingParams, sample_tokens


@dataclass(frozen=True)
class SeqExtras:
    """What a chunk's sampling needs beyond its SamplingParams (None for a chunk that needs nothing:
    a plain request, or one mid-prefill whose sampled token is thrown away)."""

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # emitted so far (len = the chunk's `steps` entry)
    eos_token_ids: Sequence[int] = ()
    mask: LogitsMaskProvider | None = None
    logprobs: int | None = None  # alternatives per emitted token (0: the token's own logprob only); None = off


def has_penalties(p: SamplingParams) -> bool:
    return (
        p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
        or bool(p.logit_bias) or p.min_tokens > 0
    )  # fmt: skip


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


@torch.inference_mode()  # the forward's logits are inference tensors: the processors update them in place
def run_extras(
    logits: torch.Tensor,  # [R, V] raw, R = sum of the chunks' num_logits
    chunks: Sequence[SeqChunk],
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    steps: Sequence[int],
    extras: Sequence[SeqExtras | None],
    draft_probs: torch.Tensor | None = None,
    full: Sequence[bool] | None = None,
    fill: MaskFiller = fill_each,
    pin: bool = False,
) -> StepOutput:
    dev, vocab = logits.device, logits.shape[-1]
    proposals = [list(c.token_ids[len(c.token_ids) - c.num_proposed :]) if c.num_proposed else [] for c in chunks]
    first: list[int] = []  # per chunk: its first sampled row among the sampled rows
    sample_rows: list[int] = []  # the logits rows that are sampled, chunk after chunk
    prompt_rows: list[int] = []
    prompt_top: list[int] = []
    off = 0
    for c, p in zip(chunks, params):
        first.append(len(sample_rows))
        sample_rows.extend(range(off + c.num_logits - c.num_proposed - 1, off + c.num_logits))
        prompt_rows.extend(range(off, off + len(c.prompt_targets)))
        prompt_top.extend([p.prompt_logprobs or 0] * len(c.prompt_targets))
        off += c.num_logits

    # Host work first, while the device still runs the forward.
    masked = [(e.mask, first[i], proposals[i]) for i, e in enumerate(extras) if e is not None and e.mask is not None]
    masks = build_masks(masked, vocab, fill, pin) if masked else None

    pending_prompt = PendingLogprobs(logits[_ids(prompt_rows, dev)], prompt_top) if prompt_rows else None
    sub = logits if len(sample_rows) == logits.shape[0] else logits[_ids(sample_rows, dev)]  # [S', V]
    lp_chunks = [i for i, e in enumerate(extras) if e is not None and e.logprobs is not None]
    lp_rows = [first[i] + j for i in lp_chunks for j in range(len(proposals[i]) + 1)]
    pending = None
    if lp_rows:
        tops = [extras[i].logprobs or 0 for i in lp_chunks for _ in range(len(proposals[i]) + 1)]  # type: ignore[union-attr]
        pending = PendingLogprobs(sub[_ids(lp_rows, dev)], tops)  # before the in-place processors below

    history = [
        RowHistory(first[i] + j, params[i], e.prompt_token_ids,
                   [*e.output_token_ids, *proposals[i][:j]] if j else e.output_token_ids, e.eos_token_ids)
        for i, e in enumerate(extras) if e is not None and has_penalties(params[i])
        for j in range(len(proposals[i]) + 1)
    ]  # fmt: skip
    if history:
        apply_penalties(sub, history)
    if masks is not None:
        bitmask, rows = masks
        apply_bitmask(sub, bitmask.to(dev, non_blocking=True), _ids(rows, dev))

    if not any(proposals):
        token_ids = [[t] for t in sample_tokens(sub, params, seeds, steps)]
    else:
        token_ids = verify(sub, proposals, params, seeds, steps, draft_probs, full)

    logprobs: list[list[TokenLogprob]] = [[] for _ in chunks]
    if pending is not None:
        # every row of a sequence was scored; rows past its emitted tokens are dropped (0 as a placeholder id)
        chosen = [(token_ids[i] + [0] * len(proposals[i]))[j] for i in lp_chunks for j in range(len(proposals[i]) + 1)]
        flat = iter(pending.resolve(chosen))
        for i in lp_chunks:
            got = [next(flat) for _ in range(len(proposals[i]) + 1)]
            logprobs[i] = got[: len(token_ids[i])]
    prompt: list[list[TokenLogprob]] = [[] for _ in chunks]
    if pending_prompt is not None:
        flat = iter(pending_prompt.resolve([t for c in chunks for t in c.prompt_targets]))
        for i, c in enumerate(chunks):
            prompt[i] = [next(flat) for _ in c.prompt_targets]
    return StepOutput(token_ids, [len(p) for p in proposals], logprobs, prompt)
