"""n > 1 and best_of: the choices' ids and seeds, and the ranking of best_of candidates (no tensors).

A request with m = best_of (or n) candidates runs as m sequences `<id>#0` .. `<id>#m-1`: #0 leads
(it prefills the prompt once), the others fork its KV blocks (engine/scheduler.py). Choice 0 keeps
the request's seed, so n = 1 and choice 0 of n > 1 give the same text; choice i > 0 gets a seed
mixed from (seed, i), so a seeded request's choices are reproducible and differ (an unseeded
request draws one random seed for all of them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from aioffload.engine.outputs import RequestOutput
from aioffload.engine.request import Request
from aioffload.engine.request_state import OutputSlot
from aioffload.worker.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def choice_ids(request_id: str, num_candidates: int) -> list[str]:
    """The sequences' ids: the request's own for a single choice."""
    if num_candidates == 1:
        return [request_id]
    return [f"{request_id}#{i}" for i in range(num_candidates)]


def choice_seed(seed: int, index: int) -> int:
    """Choice `index`'s seed: `seed` for choice 0, else splitmix64 of (seed + index * golden ratio)."""
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def rank_best_of(candidates: Sequence[RequestOutput], n: int) -> list[RequestOutput]:
    """The n finished candidates of highest cumulative logprob (ties: lower index first), best first,
    re-indexed 0..n-1 (OpenAI's choices of a best_of request)."""
    def score(o: RequestOutput) -> float:
        return o.cumulative_logprob if o.cumulative_logprob is not None else float("-inf")

    ranked = sorted(candidates, key=lambda o: (-score(o), o.index))[:n]
    for i, out in enumerate(ranked):
        out.index = i
    return ranked


def make_choices(
    seq_ids: Sequence[str], prompt_ids: list[int], params: SamplingParams, seed: int, eos_token_ids: tuple[int, ...]
) -> list[Request]:
    """The request's sequences, the leader first (its followers attached), with what each asks of a
    step: its own logits mask, logprobs (best_of ranks by them even when none are returned), and
    prompt logprobs on the leader only (its prefill is the one that scores the prompt)."""
    ranked = params.num_candidates > params.n
    reqs = []
    for i, sid in enumerate(seq_ids):
        req = Request(sid, prompt_ids, params, eos_token_ids=eos_token_ids, seed=choice_seed(seed, i))
        req.num_logprobs = params.logprobs if params.logprobs is not None else (0 if ranked else None)
        if params.prompt_logprobs is not None and i == 0:
            req.prompt_logprobs = [None]
        if params.logits_mask is not None:
            req.logits_mask = params.logits_mask()
        req.needs_extras = req.num_logprobs is not None or req.prompt_logprobs is not None or params.changes_logits
        reqs.append(req)
    leader = reqs[0]
    leader.followers = reqs[1:]
    for f in leader.followers:
        f.leader = leader
    return reqs


async def stream_choices(slot: OutputSlot, params: SamplingParams) -> AsyncIterator[RequestOutput]:
    """What `Engine.generate` yields from the choices' shared slot: every output as it comes, until all
    num_candidates finished; for best_of > n, nothing until then, and then the ranked n."""
    m = params.num_candidates
    ranked = m > params.n
    done: dict[int, RequestOutput] = {}  # choice -> its last output (ranked: all of it, merged)
    partial: dict[int, RequestOutput] = {}
    while len(done) < m:
        out = await slot.get()
        if ranked:  # a candidate's whole output, folded together until it finishes
            whole = partial.setdefault(out.index, out)
            if whole is not out:
                whole.merge(out)
            if out.finished:
                done[out.index] = partial.pop(out.index)
            continue
        if out.finished:
            done[out.index] = out
        yield out
    if ranked:
        for out in rank_best_of(list(done.values()), params.n):
            yield out
