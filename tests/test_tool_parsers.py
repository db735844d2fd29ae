"""Tool-call formats on real-looking model outputs: whole, and streamed in chunks of every size."""

from __future__ import annotations

import json
import re

import pytest

from aioffload.serving.tool_calls import CallEvent, Event, ToolCallStream
from aioffload.serving.tool_parsers import PARSERS, parser_for_template

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"timezone": "Europe/Paris"}

# (parser, model output, expected content, expected calls as (name, arguments dict))
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     "", [("get_weather", WEATHER)]),
    ("hermes", 'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": '
     '"Europe/Paris"}}\n</tool_call>', "Let me check both.\n", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}', "",
     [("get_time", TIME)]),  # the last block left unclosed at eos (Qwen does this): accepted at the end
    ("hermes", "The weather in Paris is sunny, 21 °C. <tool_ is not a call.", "The weather in Paris is sunny, "
     "21 °C. <tool_ is not a call.", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', '<tool_call>\n{"name": '
     '"get_weather", "arguments": {"city": "Par', []),  # cut off by max_tokens: the text is returned as is
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "",
     [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', "",
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("llama3_json", '  {"name": "get_time", "arguments": "{\\"timezone\\": \\"Europe/Paris\\"}"}', "",
     [("get_time", TIME)]),  # arguments written as JSON text
    ("llama3_json", "Paris is the capital of France. {\"name\": \"x\", \"parameters\": {}}",
     "Paris is the capital of France. {\"name\": \"x\", \"parameters\": {}}", []),  # calls only open a reply
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # JSON that is not a call
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
     '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]', "",
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]', "Sure. ",
     [("get_time", TIME)]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]'
     '{"timezone": "Europe/Paris"}', "", [("get_weather", WEATHER), ("get_time", TIME)]),  # v11 tokenizers
    ("mistral", "No tools needed: [TOOL_CALL is not the marker.", "No tools needed: [TOOL_CALL is not the marker.",
     []),
]  # fmt: skip


def run(parser: str, chunks: list[str], parallel: bool = True) -> list[Event]:
    stream = ToolCallStream(PARSERS[parser](), parallel)
    events: list[Event] = []
    for chunk in chunks:
        events += stream.feed(chunk)
    return events + stream.finish()


def summary(events: list[Event]) -> tuple[str, list[tuple[str, dict]]]:
    content = "".join(e for e in events if isinstance(e, str))
    calls = [(e.call.name, json.loads(e.call.arguments)) for e in events if isinstance(e, CallEvent)]
    return content, calls


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_whole_output(parser: str, text: str, content: str, calls: list) -> None:
    events = run(parser, [text])
    assert summary(events) == (content, calls)
    assert [e.index for e in events if isinstance(e, CallEvent)] == list(range(len(calls)))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_streamed_in_chunks_equals_whole(parser: str, text: str, content: str, calls: list, size: int) -> None:
    events = run(parser, [text[i : i + size] for i in range(0, len(text), size)])
    assert summary(events) == (content, calls)


def test_streaming_emits_each_call_as_soon_as_it_is_complete() -> None:
    first = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    stream = ToolCallStream(PARSERS["hermes"]())
    assert stream.feed("Checking.\n<tool_") == ["Checking.\n"]  # the tail that may open a call is held
    assert stream.feed(first[len("<tool_"):-3]) == []  # inside a call: nothing yet
    [event] = stream.feed(first[-3:] + "\n<tool_call>\n{")
    assert isinstance(event, CallEvent) and event.call.name == "get_weather" and event.index == 0
    assert json.loads(event.call.arguments) == WEATHER
    assert stream.feed('"name": "get_time", "arguments": {}}\n</tool_call>')[0].index == 1  # type: ignore[union-attr]
    assert stream.finish() == []


def test_content_streams_while_no_call_starts() -> None:
    stream = ToolCallStream(PARSERS["mistral"]())
    assert stream.feed("The answer") == ["The answer"]
    assert stream.feed(" is [TOOL") == [" is "]  # "[TOOL" may be the marker: held
    assert stream.feed("S] of Paris.") == ["[TOOLS] of Paris."]
    assert stream.finish() == []


def test_llama3_holds_until_it_knows_the_reply_kind() -> None:
    stream = ToolCallStream(PARSERS["llama3_json"]())
    assert stream.feed("  ") == [] and stream.feed("<|pyth") == []
    assert stream.feed('on_tag|>{"name": "get_time", "parameters": {}}') != []
    plain = ToolCallStream(PARSERS["llama3_json"]())
    assert plain.feed(" Hello") == [" Hello"] and plain.feed(" {") == [" {"]  # a plain reply streams at once


def test_parallel_false_keeps_the_first_call() -> None:
    text = CASES[1][1]
    content, calls = summary(run("hermes", [text], parallel=False))
    assert content == "Let me check both.\n" and calls == [("get_weather", WEATHER)]


def test_call_ids() -> None:
    ids = {e.id for e in run("hermes", [CASES[1][1]]) if isinstance(e, CallEvent)}
    assert len(ids) == 2 and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    mistral = [e.id for e in run("mistral", [CASES[10][1]]) if isinstance(e, CallEvent)]
    assert len(set(mistral)) == 2 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in mistral)


def test_wire_shapes() -> None:
    [event] = [e for e in run("hermes", [CASES[0][1]]) if isinstance(e, CallEvent)]
    function = {"name": "get_weather", "arguments": json.dumps(WEATHER)}
    assert event.wire(with_index=False) == {"id": event.id, "type": "function", "function": function}
    assert event.wire(with_index=True) == {"index": 0, "id": event.id, "type": "function", "function": function}


# Excerpts of the real chat templates: the parts that name the tool-call syntax.
LLAMA31 = ('{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}{%- if builtin_tools is defined %}'
           '{{- "Environment: ipython\\n" }}{%- endif %}{{- \'Respond in the format {"name": function name, '
           '"parameters": dictionary of argument name and its value}.\' }}{{- "<|python_tag|>" }}')
QWEN25 = '{{- "For each function call, return a json object ... within <tool_call></tool_call> XML tags" }}'
MISTRAL = '{%- if message["tool_calls"] is defined %}{{- "[TOOL_CALLS] [" }}{%- endif %}'


@pytest.mark.parametrize(("template", "name"), [(LLAMA31, "llama3_json"), (QWEN25, "hermes"), (MISTRAL, "mistral"),
                                                ("{{ messages }}", None)])
def test_parser_for_template(template: str, name: str | None) -> None:
    assert parser_for_template(template) == name
