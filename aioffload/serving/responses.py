"""The JSON objects of a response: streamed chunks and whole bodies, for one or several choices.

Every chunk of one response shares `id`, `created` and `model`. Choices are indexed as OpenAI
does: with n choices per prompt, choice i * n + j is prompt i's j-th. A chunk carries the `logprobs`
of the tokens it brings (serving/logprobs.py), or null.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class FinishedChoice:
    """A whole choice of a JSON response."""

    index: int
    text: str
    finish_reason: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's message.tool_calls
    logprobs: dict[str, Any] | None = None


class ResponseShape:
    def __init__(self, chat: bool, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model}
        self.include_usage = include_usage

    def _chunk(self, index: int, choice: dict[str, Any], logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk = {**self.head, "choices": [{"index": index, **choice, "logprobs": logprobs}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def role_chunk(self, index: int) -> dict[str, Any]:
        return self._chunk(index, {"delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def text_chunk(self, index: int, text: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            return self._chunk(index, {"delta": {"content": text}, "finish_reason": None}, logprobs)
        return self._chunk(index, {"text": text, "finish_reason": None}, logprobs)

    def tool_calls_chunk(self, index: int, calls: list[dict[str, Any]],
                         logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """`calls` in the streamed shape: each with its `index` among the choice's calls."""
        return self._chunk(index, {"delta": {"tool_calls": calls}, "finish_reason": None}, logprobs)

    def finish_chunk(self, index: int, finish_reason: str | None,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"delta": {}} if self.chat else {"text": ""}
        return self._chunk(index, {**body, "finish_reason": finish_reason}, logprobs)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def full(self, choices: list[FinishedChoice], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        out = []
        for c in choices:
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": c.text}
                if c.tool_calls:
                    message = {"role": "assistant", "content": c.text or None, "tool_calls": c.tool_calls}
                body: dict[str, Any] = {"message": message}
            else:
                body = {"text": c.text}
            out.append({"index": c.index, **body, "logprobs": c.logprobs, "finish_reason": c.finish_reason})
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "choices": out,
                "usage": usage(prompt_tokens, completion_tokens)}
