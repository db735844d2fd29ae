"""What the engine hands back to its callers (HTTP, offline generation), and its errors."""

from __future__ import annotations

from dataclasses import dataclass

from aioffload.worker.logprobs import TokenLogprob


@dataclass
class RequestOutput:
    """One incremental update of one choice of a request; deltas since that choice's previous update.

    A request with n > 1 (or best_of) yields the outputs of its choices interleaved, told apart by
    `index` (0..n-1); `finished` is per choice.
    """

    request_id: str
    text: str  # new text since the last output
    token_ids: list[int]  # new token ids since the last output
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    index: int = 0  # the choice
    # One per entry of token_ids when the request asked for logprobs (SamplingParams.logprobs), else None
    logprobs: list[TokenLogprob] | None = None
    # Prompt logprobs (SamplingParams.prompt_logprobs): on the choice's first output only; [0] is None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float | None = None  # sum of the output tokens' logprobs so far (when computed)

    def merge(self, later: RequestOutput) -> None:
        """Fold a later delta of the same choice into this one (a consumer that lags sees one output)."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:  # in place, as token_ids: merging n deltas stays linear
            if self.logprobs is None:
                self.logprobs = list(later.logprobs)
            else:
                self.logprobs.extend(later.logprobs)
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
        self.finished = later.finished
        self.finish_reason = later.finish_reason
        self.num_output_tokens = later.num_output_tokens
        if later.cumulative_logprob is not None:
            self.cumulative_logprob = later.cumulative_logprob


class EngineError(Exception):
    """Base of errors the engine raises to callers."""


class QueueFullError(EngineError):
    """The waiting queue is at --max-queue; retry later."""


class InvalidRequestError(EngineError, ValueError):
    """Sampling parameters only the engine can check (n above --max-num-seqs, a logit_bias id past
    the vocabulary); `param` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class PromptTooLongError(EngineError, ValueError):
    """The prompt (plus at least one output token) exceeds --max-model-len."""


class EngineDeadError(EngineError):
    """The engine loop stopped (shutdown or a fatal error)."""
