"""How many tokens each request gets in one `Scheduler.schedule()` call (no tensors)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aioffload.engine.request import Request

if TYPE_CHECKING:
    from aioffload.worker.step_cost import StepCost


class PrefillShare:
    """How many tokens each request gets in one schedule() call.

    A decoding request (one token left to compute) gets its token. With a step cost and
    anyone decoding, the chunks of long prompts (those that would not fit in one step's
    prefill share, `StepCost.prefill_budget_s`) share that compute, each the most that
    fits from its position; the first gets at least one token, so a long prompt progresses
    every step; a chunk so cut is cut to a size the worker has a chunk graph for, where one
    fits (StepCost.graph_chunk). Short prompts go whole, as when nobody is decoding: a chunk takes what
    budget is left. A chunk that scores the prompt (prompt logprobs: a logits row per token) takes
    at most `max_rows` tokens, the logits rows the placement reserves for a step.

    With nobody decoding, the step's first chunk, when it is a prompt's first (from position 0),
    may take up to `idle_budget` tokens (`chunk_tokens`), so a lone long prompt runs in one step
    where no decode's ITL bounds it; every other chunk takes what is left of `token_budget`. A
    burst of prompts so keeps its staggered first tokens, and a chunk after a cached prefix keeps
    the shapes the worker built cuDNN's plans for. Measured on the H200: a lone 32000-token prompt
    in 16 steps of 2048 tokens 1.55-1.63x the compute floor, in one 1.27x (BENCHMARKS.md, fifth and
    eighth sessions).
    """

    def __init__(
        self, running: list[Request], cost: StepCost | None, max_rows: int, token_budget: int,
        idle_budget: int | None = None,
    ) -> None:  # fmt: skip
        decoding = any(r.num_tokens - r.num_computed_tokens == 1 for r in running)
        self.cost = cost if decoding else None
        self.token_budget = token_budget
        self.idle_budget = None if decoding else idle_budget
        self.step_budget = step_budget(decoding, token_budget, idle_budget)
        self.taken = 0  # tokens handed out this step
        self.share_s = cost.prefill_budget_s() if cost is not None else 0.0
        self.seconds = self.share_s  # what the long prompts' chunks have left this step
        self.first = True
        self.max_rows = max_rows

    def take(self, request: Request, budget: int) -> int:
        """Tokens for `request` (budget >= 1); 0 when its chunk must wait for a later step."""
        left = request.num_tokens - request.num_computed_tokens
        start = request.num_computed_tokens
        n = min(budget, chunk_tokens(left, start, self.taken, self.token_budget, self.idle_budget))
        if left > 1 and self.cost is not None and self.cost.max_chunk(start, self.share_s) < left:
            n = self.cost.graph_chunk(min(n, self.cost.max_chunk(start, self.seconds)))
            n = max(n, 1) if self.first else n
            self.seconds -= self.cost.chunk_s(n, start)
            self.first = self.first and n == 0
        if request.wants_prompt_logprobs:
            n = min(n, self.max_rows)
        self.taken += n
        return n


def step_budget(decoding: bool, token_budget: int, idle_budget: int | None) -> int:
    """A step's tokens: the token budget, or with nobody decoding the idle budget where it is larger."""
    return token_budget if decoding else max(token_budget, idle_budget or 0)


def chunk_tokens(left: int, start: int, taken: int, token_budget: int, idle_budget: int | None) -> int:
    """Tokens of a request's next chunk from position `start`, `left` to go, after `taken` tokens of
    the step went to others: the step's first chunk of a fresh prompt up to the idle budget (None:
    someone is decoding), any other what the token budget has left."""
    if taken == 0 and start == 0 and idle_budget is not None:
        return min(left, max(token_budget, idle_budget))
    return max(0, min(left, token_budget - taken))
