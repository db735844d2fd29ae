"""Client-side checks of one OpenAI-style completion: an SSE stream parsed chunk by chunk, or one JSON body.

Pure Python (no Locust, no network), so the rules are unit-tested in tests/test_load.py.

The token rule. The server sends one SSE chunk per engine output and skips outputs with no
text (an EOS token, a partial UTF-8 character, text held back while it may start a stop
string); when the client lags, the engine merges several tokens' deltas into one chunk. So a
text chunk carries at least one token and the only sound rule is

    text_chunks <= usage.completion_tokens <= max_tokens,

plus: finish_reason "length" means completion_tokens == max_tokens exactly (the server
refuses prompt + max_tokens > --max-model-len, so "length" always means max_tokens), and
with ignore_eos (and no stop strings) the finish reason must be "length".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DONE = "[DONE]"


class ResponseError(Exception):
    """The response breaks the protocol or the token rule; the message says how."""


@dataclass
class StreamResult:
    """What one stream delivered; times are seconds since the request was sent."""

    text: str = ""
    text_chunks: int = 0
    first_text_at: float | None = None  # time to first token (first chunk with text, not the role chunk)
    gaps: list[float] = field(default_factory=list)  # inter-token latency: every gap between text chunks
    last_text_at: float | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False
    ids: set[str] = field(default_factory=set)


class SSEParser:
    """Feed raw body bytes as they arrive (`feed(data, t)`), then `finish()` for the checked result."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.result = StreamResult()
        self._buffer = b""
        self._saw_role = False

    def feed(self, data: bytes, t: float) -> None:
        self._buffer += data.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            self._event(event, t)

    def _event(self, event: bytes, t: float) -> None:
        r = self.result
        data_lines = []
        for line in event.decode("utf-8", errors="strict").split("\n"):
            if line.startswith(":"):  # an SSE comment (keep-alive)
                continue
            if not line.startswith("data:"):
                raise ResponseError(f"malformed SSE line {line[:80]!r}")
            data_lines.append(line[5:].removeprefix(" "))
        if not data_lines:
            return
        payload = "\n".join(data_lines)
        if r.done:
            raise ResponseError("data after [DONE]")
        if payload == DONE:
            r.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise ResponseError(f"chunk is not JSON: {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise ResponseError(f"chunk is not an object: {payload[:80]!r}")
        if "error" in chunk:
            raise ResponseError(f"error in stream: {json.dumps(chunk['error'])[:200]}")
        self._chunk(chunk, t)

    def _chunk(self, chunk: dict[str, Any], t: float) -> None:
        r = self.result
        r.ids.add(str(chunk.get("id")))
        if len(r.ids) > 1:
            raise ResponseError(f"chunk ids differ: {sorted(r.ids)}")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise ResponseError("chunk without a choices list")
        if chunk.get("usage") is not None:
            if choices or r.finish_reason is None or r.usage is not None:
                raise ResponseError("the usage chunk must come once, after finish_reason, with choices []")
            r.usage = chunk["usage"]
            return
        if len(choices) != 1 or not isinstance(choices[0], dict):
            raise ResponseError(f"expected one choice object, got {json.dumps(choices)[:200]}")
        if r.finish_reason is not None:
            raise ResponseError("a choice chunk after finish_reason")
        choice = choices[0]
        text = self._text(choice)
        if text:
            if r.last_text_at is None:
                r.first_text_at = t
            else:
                r.gaps.append(t - r.last_text_at)
            r.last_text_at = t
            r.text += text
            r.text_chunks += 1
        if choice.get("finish_reason") is not None:
            r.finish_reason = choice["finish_reason"]

    def _text(self, choice: dict[str, Any]) -> str:
        if not self.chat:
            text = choice.get("text")
            if not isinstance(text, str):
                raise ResponseError("completion chunk without a text string")
            return text
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            raise ResponseError("chat chunk without a delta object")
        if "role" in delta:
            if self._saw_role or self.result.text_chunks:
                raise ResponseError("the role chunk must come once, first")
            self._saw_role = True
        content = delta.get("content") or ""
        if not isinstance(content, str):
            raise ResponseError("delta.content is not a string")
        return content

    def finish(self, max_tokens: int, ignore_eos: bool) -> StreamResult:
        """Check the whole stream; raises ResponseError, else returns the result."""
        r = self.result
        if self._buffer.strip():
            raise ResponseError(f"stream ended inside an event: {self._buffer[:80]!r}")
        if not r.done:
            raise ResponseError("stream ended without [DONE]")
        if self.chat and not self._saw_role:
            raise ResponseError("chat stream without the role chunk")
        if r.usage is None:
            raise ResponseError("no usage chunk (stream_options.include_usage was set)")
        check_usage(r.usage, r.finish_reason, r.text_chunks, max_tokens, ignore_eos)
        return r


def check_usage(usage: Any, finish_reason: Any, text_chunks: int, max_tokens: int, ignore_eos: bool) -> int:
    """The token rule (module docstring); returns usage.completion_tokens. `text_chunks` is 0 for
    a non-streamed body, where it bounds nothing."""
    if not isinstance(usage, dict):
        raise ResponseError("usage is not an object")
    prompt, completion, total = (usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    if not all(isinstance(v, int) for v in (prompt, completion, total)):
        raise ResponseError(f"usage fields are not integers: {usage}")
    if prompt < 1 or total != prompt + completion:
        raise ResponseError(f"inconsistent usage: {usage}")
    if finish_reason not in ("stop", "length"):
        raise ResponseError(f"finish_reason {finish_reason!r} (want stop or length)")
    if not 1 <= completion <= max_tokens:
        raise ResponseError(f"completion_tokens {completion} outside [1, max_tokens={max_tokens}]")
    if text_chunks > completion:
        raise ResponseError(f"{text_chunks} text chunks but usage.completion_tokens is {completion}")
    if finish_reason == "length" and completion != max_tokens:
        raise ResponseError(f"finish_reason length after {completion} tokens, max_tokens is {max_tokens}")
    if ignore_eos and finish_reason != "length":
        raise ResponseError(f"finish_reason {finish_reason!r} with ignore_eos (want length)")
    return completion


def check_body(body: Any, chat: bool, max_tokens: int, ignore_eos: bool) -> tuple[str, int]:
    """Check a non-streamed completion; returns (text, completion_tokens)."""
    if not isinstance(body, dict) or "error" in body:
        raise ResponseError(f"not a completion: {json.dumps(body)[:200]}")
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise ResponseError("expected one choice")
    choice = choices[0]
    if chat:
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or message.get("role") != "assistant":
            raise ResponseError("chat choice without an assistant message")
    else:
        text = choice.get("text")
    if not isinstance(text, str):
        raise ResponseError("choice without text")
    tokens = check_usage(body.get("usage"), choice.get("finish_reason"), 0, max_tokens, ignore_eos)
    return text, tokens
