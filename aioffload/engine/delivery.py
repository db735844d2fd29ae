"""After a step: the scheduler records it, mask providers advance, tokens and logprobs reach the
requests' output slots (detokenized, stop strings applied, one token at a time as a plain run would)."""

from __future__ import annotations

from aioffload.engine.request import Request
from aioffload.engine.request_state import RequestState
from aioffload.engine.scheduler import Scheduler
from aioffload.engine.stats import StepStats
from aioffload.engine.step_plan import StepPlan
from aioffload.engine.worker_step import StepResult
from aioffload.worker.logprobs import TokenLogprob


def deliver_step(
    plan: StepPlan, step: StepResult, scheduler: Scheduler, states: dict[str, RequestState], stats: StepStats
) -> None:
    """Record the step in the scheduler, then hand each request's new tokens to its output slot."""
    if step.prompt_logprobs:  # before update: a leader's followers read its prompt logprobs
        for req in plan.requests:
            scored = step.prompt_logprobs.get(req.request_id)
            if scored and req.prompt_logprobs is not None:
                req.prompt_logprobs.extend(scored)
    sampled = step.tokens
    before = {req.request_id: len(req.output_token_ids) for req in plan.requests}
    updated = scheduler.update(plan, sampled)
    for req in updated:
        rid = req.request_id
        new = req.output_token_ids[before[rid] :]
        if req.logits_mask is not None and not req.is_finished:
            new = _advance_mask(scheduler, req, new)
        st = states.get(rid)
        lps = step.logprobs.get(rid) if step.logprobs else None
        used = _deliver(scheduler, states, req, st, new, lps) if st is not None else len(new)
        stats.generation_tokens_total += used
        k = plan.num_spec_tokens.get(rid, 0)
        if k:
            stats.record_verification(k, len(sampled[rid]) - 1, used)


def _advance_mask(scheduler: Scheduler, req: Request, new: list[int]) -> list[int]:
    """Advance the request's mask provider on its new tokens; a finished provider ends the request
    ("stop") after the token that finished it. Returns the tokens that count."""
    mask = req.logits_mask
    assert mask is not None
    for i, token in enumerate(new):
        mask.accept(token)
        if mask.is_finished:
            scheduler.finish(req.request_id, "stop")
            return new[: i + 1]
    return new


def _deliver(
    scheduler: Scheduler, states: dict[str, RequestState], req: Request, st: RequestState, new: list[int],
    lps: list[TokenLogprob] | None,
) -> int:
    """Hand this step's new tokens (and their logprobs, when computed) to the request's output slot,
    one at a time as a plain run would (stop strings end it mid-way); returns how many counted."""
    outs = []
    used = 0
    for i, token in enumerate(new):
        out = st.on_token(token, lps[i] if lps else None)
        used += 1
        if out is not None:
            outs.append(out)
        if st.stop_hit:
            break
    if st.stop_hit and not req.is_finished:
        scheduler.finish(req.request_id, "stop")
    last = outs.pop() if outs else None
    for out in outs:
        st.slot.put(out)
    if req.is_finished or st.stop_hit:
        # A stop string before the scheduler's own stop token wins: a plain run would have ended there.
        last = st.close(last, "stop" if used < len(new) else (req.finish_reason or "stop"))
        del states[req.request_id]
    if last is not None:
        st.slot.put(last)
    return used
