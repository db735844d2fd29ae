"""Tool calls out of a generation: the streaming driver over a format's parser, and the text it reads.

`ToolCallStream` turns the text of one choice, delta by delta, into content deltas and complete
tool calls. A call is emitted as one `tool_calls` delta as soon as it has fully arrived (name and
whole arguments); content streams as it comes, except a tail that may open a call. A JSON
response is the same events gathered, so streamed and non-streamed replies agree.

`ToolCallReader` feeds it the engine's text. Some formats open calls with a special token
(`[TOOL_CALLS]`, `<|python_tag|>`), so a tool-parsing request asks the engine to keep special
tokens in its text (SamplingParams.skip_special_tokens=False); the engine leaves out the ids that
end generation and applies stop strings and min_tokens as for any request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aioffload.serving.tool_parsers import ParsedCall, Scan, ToolParser


@dataclass(frozen=True)
class CallEvent:
    index: int  # the call's index within the choice
    id: str
    call: ParsedCall

    def wire(self, with_index: bool) -> dict[str, object]:
        """OpenAI's shape: `message.tool_calls[i]`, or with `index` a streamed `delta.tool_calls[i]`."""
        body: dict[str, object] = {"id": self.id, "type": "function",
                                   "function": {"name": self.call.name, "arguments": self.call.arguments}}
        return {"index": self.index, **body} if with_index else body


Event = str | CallEvent  # a content delta or a complete call


class ToolCallStream:
    """Feed text deltas, then `finish()`; `parallel=False` keeps only the first call."""

    def __init__(self, parser: ToolParser, parallel: bool = True) -> None:
        self.parser = parser
        self.parallel = parallel
        self.text = ""
        self.content_sent = 0
        self.calls_seen = 0
        self.num_calls = 0  # calls emitted

    def feed(self, delta: str) -> list[Event]:
        if not delta:  # a token whose text is held back (a stop string may start): nothing new to scan
            return []
        self.text += delta
        return self._events(final=False)[0]

    def finish(self) -> list[Event]:
        events, scan = self._events(final=True)
        if scan.rest is not None and self.text[scan.rest:].strip():
            events.append(self.text[scan.rest:])  # a call that never completed, or text after the calls
        elif scan.rest is None and self.content_sent < len(self.text):
            events.append(self.text[self.content_sent:])
        return events

    def _events(self, final: bool) -> tuple[list[Event], Scan]:
        scan = self.parser.scan(self.text, final)
        events: list[Event] = []
        if scan.content_end > self.content_sent:
            events.append(self.text[self.content_sent : scan.content_end])
            self.content_sent = scan.content_end
        for call in scan.calls[self.calls_seen :]:
            if self.parallel or self.num_calls == 0:
                events.append(CallEvent(self.num_calls, self.parser.new_call_id(), call))
                self.num_calls += 1
        self.calls_seen = len(scan.calls)
        return events, scan


class ToolCallReader:
    """Reads one choice's outputs for tool calls: the engine's text deltas (special tokens kept:
    the request's SamplingParams.skip_special_tokens is False) -> events."""

    def __init__(self, calls: ToolCallStream) -> None:
        self.calls = calls

    def read(self, token_ids: Sequence[int], text: str) -> list[Event]:
        return self.calls.feed(text)

    def finish(self) -> list[Event]:
        return self.calls.finish()

    @property
    def called(self) -> bool:
        return self.calls.num_calls > 0
