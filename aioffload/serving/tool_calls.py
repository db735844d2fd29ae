"""Tool calls out of a generation: the streaming driver over a format's parser, and the text it reads.

`ToolCallStream` turns the text of one choice, delta by delta, into content deltas and complete
tool calls. A call is emitted as one `tool_calls` delta as soon as it has fully arrived (name and
whole arguments); content streams as it comes, except a tail that may open a call. A JSON
response is the same events gathered, so streamed and non-streamed replies agree.

`ToolOutputText` is the text that driver reads. The engine's text skips special tokens, and some
formats open calls with one (`[TOOL_CALLS]`, `<|python_tag|>`), so tool-parsing choices decode
their own token ids with special tokens kept, leaving out the ids that end generation (eos,
stop_token_ids) and cutting at a stop string, as the engine does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aioffload.checkpoint.tokenizer import IncrementalDetokenizer, Tokenizer
from aioffload.serving.tool_parsers import ParsedCall, ToolParser
from aioffload.worker.sampling import SamplingParams, find_stop_string


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
        self.text += delta
        return self._events(final=False)

    def finish(self) -> list[Event]:
        events = self._events(final=True)
        scan = self.parser.scan(self.text, final=True)
        if scan.rest is not None and self.text[scan.rest:].strip():
            events.append(self.text[scan.rest:])  # a call that never completed, or text after the calls
        elif scan.rest is None and self.content_sent < len(self.text):
            events.append(self.text[self.content_sent:])
        return events

    def _events(self, final: bool) -> list[Event]:
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
        return events


class ToolOutputText:
    """One choice's output text with special tokens kept: feed token ids, get text deltas."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 eos_token_ids: Sequence[int]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=False)
        self.excluded = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.stops = params.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = 0
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        for t in token_ids:
            if t not in self.excluded:
                self.detok.push(t)
        return self._delta(final=False)

    def flush(self) -> str:
        self.detok.flush()
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.detok.text
        end = len(text) if final else max(self.sent, len(text) - self.hold)
        if self.stops:
            cut = find_stop_string(text, self.stops, start=max(0, self.sent - self.hold))
            if cut is not None:
                end, self.stopped = cut, True
        delta, self.sent = text[self.sent : end], max(self.sent, end)
        return delta


class ToolCallReader:
    """Reads one choice's outputs for tool calls: token ids -> text with specials -> events."""

    def __init__(self, text: ToolOutputText, calls: ToolCallStream) -> None:
        self.text = text
        self.calls = calls

    def read(self, token_ids: Sequence[int], text: str) -> list[Event]:
        return self.calls.feed(self.text.push(token_ids))  # the engine's `text` skips special tokens

    def finish(self) -> list[Event]:
        return self.calls.feed(self.text.flush()) + self.calls.finish()

    @property
    def called(self) -> bool:
        return self.calls.num_calls > 0
