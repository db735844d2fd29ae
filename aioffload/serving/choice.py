"""A response's choices and the engine requests (jobs) they come from; readers of a choice's output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from aioffload.serving.logprobs import Item, LogprobsWriter
from aioffload.serving.metrics import RequestTracker
from aioffload.serving.tool_calls import Event
from aioffload.worker.sampling import SamplingParams


class Reader(Protocol):
    """Turns one choice's engine outputs into events: content deltas and tool calls."""

    def read(self, token_ids: list[int], text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...

    @property
    def called(self) -> bool: ...


class TextReader:
    called = False

    def read(self, token_ids: list[int], text: str) -> list[Event]:
        return [text] if text else []

    def finish(self) -> list[Event]:
        return []


@dataclass
class Choice:
    """One choice of a response, and what has come of it."""

    index: int  # in the response: prompt * n + j
    reader: Reader = field(default_factory=TextReader)
    logprobs: LogprobsWriter | None = None  # set when the request asked for logprobs
    echo: str | None = None  # completions `echo`: the prompt's text, sent before the first output
    started: bool = False
    texts: list[str] = field(default_factory=list)  # JSON responses: the content gathered
    calls: list[dict[str, Any]] = field(default_factory=list)
    pending: list[Item] = field(default_factory=list)  # logprobs not sent yet

    def take_logprobs(self, always: bool = False) -> dict[str, Any] | None:
        """The pending logprobs as the response's object (None when there are none to send)."""
        if self.logprobs is None or not (self.pending or always):
            return None
        out, self.pending = self.logprobs.format(self.pending), []
        return out


@dataclass
class Job:
    """One engine request: one prompt and its choices (the engine's index j is `choices[j]`)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    tracker: RequestTracker
    choices: list[Choice]
    engine_done: bool = False  # the engine no longer holds the request: no abort needed
    unfinished: int = -1

    def __post_init__(self) -> None:
        self.unfinished = len(self.choices)
