"""One step as the worker sees it: the plan's requests as chunks (and extras), and the results back
per request. No tensors.

`extras` is None unless a request of the step asks for logprobs, prompt logprobs, a penalty, a
bias, min_tokens or a logits mask (`Request.needs_extras`, decided once at admission), so a step of
plain requests takes the worker's plain path. A request asking prompt logprobs gets its prefill
chunks scored (`SeqChunk.prompt_targets`); a prefill that restarts from 0 (preemption) drops what
it had scored, so every prompt position is delivered once.
"""

from __future__ import annotations

from dataclasses import dataclass

from aioffload.attention.kv_cache import BlockManager
from aioffload.engine.scheduler import StepPlan
from aioffload.worker.inputs import SeqChunk
from aioffload.worker.logprobs import TokenLogprob
from aioffload.worker.outputs import StepOutput
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.step_extras import SeqExtras


@dataclass
class WorkerStep:
    """`Worker.execute`'s arguments for one plan."""

    chunks: list[SeqChunk]
    params: list[SamplingParams]
    seeds: list[int]
    steps: list[int]
    num_draft: list[int] | None
    extras: list[SeqExtras | None] | None


@dataclass
class StepResult:
    """Per request id: its emitted tokens; the logprobs of those (where asked; aligned with the tokens);
    the prompt logprobs its chunk scored (in prompt order, continuing what it had)."""

    tokens: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprob]] | None = None
    prompt_logprobs: dict[str, list[TokenLogprob]] | None = None


def build_worker_step(plan: StepPlan, block_manager: BlockManager) -> WorkerStep:
    chunks: list[SeqChunk] = []
    params, seeds, steps, num_draft = [], [], [], []
    any_extras = False
    for req in plan.requests:
        rid = req.request_id
        n, k = plan.num_scheduled_tokens[rid], plan.num_spec_tokens.get(rid, 0)
        start = req.num_computed_tokens
        table = block_manager.block_table(rid)
        known = req.token_ids(start, start + n - k)
        proposals = plan.spec_token_ids.get(rid)
        if proposals is not None:  # prompt lookup: the proposals ride in the chunk
            chunks.append(SeqChunk([*known, *proposals], start, table, num_logits=k + 1))
            num_draft.append(0)
        elif req.wants_prompt_logprobs:  # a prefill chunk (never with proposals): score the prompt tokens it predicts
            scored = req.prompt_logprobs
            assert scored is not None and k == 0
            if start == 0:
                del scored[1:]  # a restart after preemption: score again, deliver once
            assert len(scored) == start + 1, "prompt chunks are scored in order"
            targets = req.prompt_token_ids[start + 1 : min(start + n + 1, req.num_prompt_tokens)]
            chunks.append(SeqChunk(known, start, table, num_logits=n if targets else 1, prompt_targets=targets))
            num_draft.append(0)
        else:  # k == 0, or the worker's draft model proposes k
            chunks.append(SeqChunk(known, start, table))
            num_draft.append(k)
        params.append(req.sampling)
        seeds.append(req.seed)
        steps.append(len(req.output_token_ids))
        any_extras = any_extras or req.needs_extras
    extras: list[SeqExtras | None] | None = None
    if any_extras:
        extras = []
        for req in plan.requests:
            n, k = plan.num_scheduled_tokens[req.request_id], plan.num_spec_tokens.get(req.request_id, 0)
            final = req.num_computed_tokens + n - k == req.num_tokens  # its sampled token is kept
            extras.append(
                SeqExtras(req.prompt_token_ids, req.output_token_ids, req.eos_token_ids, req.logits_mask,
                          req.num_logprobs) if req.needs_extras and final else None
            )  # fmt: skip
    return WorkerStep(chunks, params, seeds, steps, num_draft if any(num_draft) else None, extras)


def collect(plan: StepPlan, out: StepOutput) -> StepResult:
    result = StepResult({req.request_id: t for req, t in zip(plan.requests, out.token_ids, strict=True)})
    if out.logprobs is not None:
        result.logprobs = {r.request_id: lp for r, lp in zip(plan.requests, out.logprobs) if lp}
    if out.prompt_logprobs is not None:
        result.prompt_logprobs = {r.request_id: lp for r, lp in zip(plan.requests, out.prompt_logprobs) if lp}
    return result
