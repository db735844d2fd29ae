"""How many tokens to propose per sequence per step (DESIGN.md section 8, lever 2). No tensors.

With acceptance rate a (the chance that a proposal is accepted given that the ones before it were),
the j-th proposal of a step is emitted with probability a^j. Its cost is one more verification row
(while offload is active a step costs the copy floor up to the token budget, so a row costs about
1/token_budget of a step) plus, with a draft model, one more draft forward (draft_step_s / step_s of
a step). k is the largest count whose last proposal still pays for itself:

    a^k >= 1 / token_budget + draft_step_s / step_s,    k <= --num-speculative-tokens

The scheduler then fits k into what is left of the step (the token budget, and the logits rows the
placement reserved: max_num_seqs per step); at large batches nothing is left and k is 0.

The acceptance rate is measured: per request, shrunk towards the rate over all requests.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from aioffload.config import SpeculativeConfig
from aioffload.engine.ngram import propose_ngram
from aioffload.engine.request import Request

log = logging.getLogger("aioffload.engine")

PRIOR_ACCEPTANCE = 0.5  # before anything was measured
PRIOR_WEIGHT = 4.0  # trials' worth of the prior, globally and per request


def worthwhile_k(acceptance: float, min_gain: float, cap: int) -> int:
    """The largest k <= cap with acceptance^k >= min_gain (0 when not even one proposal pays)."""
    if acceptance <= 0.0 or min_gain >= 1.0:
        return 0
    if acceptance >= 1.0 or min_gain <= 0.0:
        return cap
    return max(0, min(cap, math.floor(math.log(min_gain) / math.log(acceptance) + 1e-9)))


def resolve_method(config: SpeculativeConfig, offload_active: bool) -> str:
    """"ngram" | "draft" | "off": auto means prompt lookup while offload is active (its rows are free), else off."""
    if config.method == "auto":
        return "ngram" if offload_active else "off"
    return config.method


@dataclass
class Speculation:
    """The scheduler's speculative policy: k per request, prompt-lookup proposals, acceptance statistics.

    `step_s` (mean step time) is kept current by the engine; `draft_step_s` is the draft model's
    measured forward time (0 for prompt lookup).
    """

    method: str  # "ngram" | "draft"
    config: SpeculativeConfig
    draft_step_s: float = 0.0
    step_s: float = 0.0
    accepted_total: int = 0
    trials_total: int = 0

    def acceptance(self, request: Request) -> float:
        """Estimated chance that the next proposal for `request` is accepted."""
        overall = (self.accepted_total + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.trials_total + PRIOR_WEIGHT)
        return (request.num_spec_accepted + overall * PRIOR_WEIGHT) / (request.num_spec_trials + PRIOR_WEIGHT)

    def min_gain(self, token_budget: int) -> float:
        """Expected accepted tokens a proposal must bring to pay for its row and its draft forward."""
        draft = self.draft_step_s / self.step_s if self.step_s > 0 else 0.0
        return 1.0 / max(1, token_budget) + draft

    def num_wanted(self, request: Request, token_budget: int) -> int:
        return worthwhile_k(self.acceptance(request), self.min_gain(token_budget), self.config.num_tokens)

    def propose(self, request: Request, k: int) -> list[int] | None:
        """Prompt lookup: up to k tokens (maybe none). None for the draft model: the worker proposes k."""
        if self.method == "draft":
            return None
        c = self.config
        return propose_ngram(request.all_token_ids, k, c.ngram_min, c.ngram_max)

    def record(self, request: Request, proposed: int, accepted: int) -> None:
        """One verification: `accepted` of `proposed` proposals were accepted (a leading run)."""
        trials = min(accepted + 1, proposed)  # the accepted ones, and the one rejected after them
        request.num_spec_accepted += accepted
        request.num_spec_trials += trials
        self.accepted_total += accepted
        self.trials_total += trials
