"""A request as the scheduler sees it: token ids and progress, never tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from aioffload.worker.logprobs import TokenLogprob
from aioffload.worker.masks import LogitsMaskProvider
from aioffload.worker.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 0  # resolved seed (sampling.seed or a random one): same seed, same tokens
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_preemptions: int = 0
    num_spec_accepted: int = 0  # speculative proposals accepted, over the request's life
    num_spec_trials: int = 0  # proposals whose acceptance was decided (accepted, or the one rejected)
    # --- issue 13: only requests that ask carry these (`needs_extras`, set once by the engine) ---
    needs_extras: bool = False  # the worker runs step_extras for its final chunks
    logits_mask: LogitsMaskProvider | None = None  # this sequence's own provider (sampling.logits_mask())
    num_logprobs: int | None = None  # alternatives computed per output token (None: no logprobs at all)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, filled while prefilling
    # n / best_of: the leader prefills the prompt once; at the end of its prefill each follower forks
    # its KV blocks and takes a seat in running (see Scheduler).
    leader: Request | None = None  # set on a follower until it forks
    followers: list[Request] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids of positions [start, end) without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_seats(self) -> int:
        """Places in running this request needs: itself and its followers not yet forked."""
        return 1 + len(self.followers)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet (its prefill chunks score the prompt)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
