"""One step's plan: which requests compute how many tokens (no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aioffload.engine.request import Request


@dataclass(frozen=True)
class StepPlan:
    """What the model computes in one step: running requests first, then new admissions."""

    num_scheduled_tokens: dict[str, int]  # request_id -> tokens this step (proposals included), in batch order
    requests: list[Request]  # the same requests, same order
    preempted_ids: list[str]  # preempted during the schedule() call that built this plan
    # request_id -> k proposed tokens among its scheduled ones (after its known tokens); only k >= 1
    num_spec_tokens: dict[str, int] = field(default_factory=dict)
    # request_id -> prompt-lookup proposals (len = k); absent where the worker's draft model proposes
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # copy-on-write: (src, dst) KV blocks the worker copies before this step's forward
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens
