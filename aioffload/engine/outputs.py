"""What the engine hands back to its callers (HTTP, offline generation), and its errors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    """One incremental update of a request; deltas since the previous update."""

    request_id: str
    text: str  # new text since the last output
    token_ids: list[int]  # new token ids since the last output
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative


class EngineError(Exception):
    """Base of errors the engine raises to callers."""


class QueueFullError(EngineError):
    """The waiting queue is at --max-queue; retry later."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt (plus at least one output token) exceeds --max-model-len."""


class EngineDeadError(EngineError):
    """The engine loop stopped (shutdown or a fatal error)."""
