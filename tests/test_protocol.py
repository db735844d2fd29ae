"""Wire types and request checks, without a server: unknown, informational and unimplemented fields,
prompt shapes, chat messages with tool calls, the tool plan, the OpenAPI document."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from aioffload.serving.chat import template_messages, tool_plan
from aioffload.serving.openapi import openapi_document
from aioffload.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest, decode_request
from aioffload.serving.structured_output import response_format_spec
from aioffload.serving.tool_grammar import tool_call_spec, tool_mode
from aioffload.serving.tool_parsers import HermesParser, MistralParser
from aioffload.serving.validation import UNSUPPORTED, completion_prompts, refuse_unsupported, sampling_params
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.structured import GrammarSpec

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def chat(**fields: Any) -> ChatCompletionRequest:
    return decode_request(json.dumps({"messages": MSG, **fields}).encode(), ChatCompletionRequest)


def completion(**fields: Any) -> CompletionRequest:
    return decode_request(json.dumps({"prompt": "hi", **fields}).encode(), CompletionRequest)


def refusal(fn: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize(("kind", "body", "param"), [
    (CompletionRequest, {"prompt": "hi", "temprature": 0.5}, "temprature"),
    (CompletionRequest, {"prompt": "hi", "stream_options": {"include_usage": True, "usage": 1}},
     "stream_options.usage"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x", "nmae": "a"}]}, "messages[0].nmae"),
    (ChatCompletionRequest, {"messages": MSG, "tools": [{**TOOL, "function": {"name": "f", "params": {}}}]},
     "tools[0].function.params"),
    (ChatCompletionRequest, {"messages": MSG, "guided_json": {}}, "guided_json"),
    (ChatCompletionRequest, {"messages": MSG, "echo": True}, "echo"),  # a completions field, not chat's
])  # fmt: skip
def test_unknown_fields_are_named(kind: type, body: dict[str, Any], param: str) -> None:
    e = refusal(decode_request, json.dumps(body).encode(), kind)
    assert e.param == param and f"`{param}`" in e.message and "does not implement" in e.message


def test_informational_fields_are_accepted() -> None:
    req = chat(user="u1", store=False, metadata={"k": "v"}, service_tier="auto", prompt_cache_key="p",
               safety_identifier="s", messages=[{"role": "assistant", "content": "x", "refusal": None}, *MSG])
    refuse_unsupported(req)
    refuse_unsupported(completion(user="u2"))


# field -> (a neutral value clients send by default, a value that would change the output)
VALUES: dict[str, tuple[Any, Any]] = {
    "suffix": ("", "end"), "min_p": (0.0, 0.1), "modalities": (["text"], ["text", "audio"]),
    "audio": (None, {"voice": "alloy", "format": "wav"}), "prediction": (None, {"type": "content", "content": "x"}),
    "reasoning_effort": (None, "low"), "web_search_options": (None, {}),
    "functions": (None, [{"name": "f"}]), "function_call": (None, "auto"),
}  # fmt: skip


def test_every_unsupported_field_has_test_values() -> None:
    assert set(VALUES) == set(UNSUPPORTED)


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_unimplemented_fields_refused_unless_neutral(field: str) -> None:
    neutral, active = VALUES[field]
    kind = CompletionRequest if field == "suffix" else ChatCompletionRequest
    make = completion if kind is CompletionRequest else chat
    refuse_unsupported(make(**{field: neutral}))
    e = refusal(refuse_unsupported, make(**{field: active}))
    assert e.param == field and e.message.startswith(f"{field}: ")
    if field != "min_p":  # min_p is in both structs
        assert field not in ChatCompletionRequest.__struct_fields__ or kind is ChatCompletionRequest


def params_of(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    refuse_unsupported(req)
    return sampling_params(req, 5, 256, 16, "prompt")


# Fields that were in VALUES (refused unless neutral) until issue 13's second half: (kind, request fields,
# the SamplingParams they give, compared field by field)
IMPLEMENTED: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("chat", {"n": 2}, {"n": 2, "best_of": None}), ("completion", {"best_of": 3}, {"n": 1, "best_of": 3}),
    ("completion", {"n": 2, "best_of": 2, "stream": True}, {"n": 2, "best_of": 2}),
    ("completion", {"logprobs": 2}, {"logprobs": 2, "prompt_logprobs": None}),
    ("completion", {"logprobs": 0}, {"logprobs": 0}), ("completion", {"logprobs": False}, {"logprobs": None}),
    ("completion", {"echo": True, "logprobs": 1}, {"logprobs": 1, "prompt_logprobs": 1}),
    ("completion", {"echo": True}, {"logprobs": None, "prompt_logprobs": None}),  # the text only
    ("chat", {"logprobs": True}, {"logprobs": 0}), ("chat", {"logprobs": True, "top_logprobs": 3}, {"logprobs": 3}),
    ("chat", {"logprobs": False, "top_logprobs": 0}, {"logprobs": None}),
    ("chat", {"presence_penalty": 0.5, "frequency_penalty": -1.0}, {"presence_penalty": 0.5, "frequency_penalty": -1}),
    ("completion", {"repetition_penalty": 1.2}, {"repetition_penalty": 1.2}),
    ("chat", {"logit_bias": {"50": 100, "7": -2.5}}, {"logit_bias": ((7, -2.5), (50, 100.0))}),
    ("completion", {"min_tokens": 4}, {"min_tokens": 4}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "fields", "expected"), IMPLEMENTED)
def test_implemented_fields_map_to_sampling_params(kind: str, fields: dict[str, Any], expected: dict[str, Any]) -> None:
    params = params_of((chat if kind == "chat" else completion)(**fields))
    assert {k: getattr(params, k) for k in expected} == expected


def test_response_format_maps_to_a_grammar() -> None:
    assert response_format_spec(chat(response_format={"type": "json_object"}).response_format) == \
        GrammarSpec("json_object")
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"enum": [1, 2]}}}
    fmt = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    spec = response_format_spec(fmt.response_format)
    assert spec is not None and spec.kind == "json_schema" and json.loads(spec.schema or "") == schema
    assert list(json.loads(spec.schema or "")["properties"]) == ["b", "a"]  # the order the model writes them
    assert response_format_spec(chat(response_format={"type": "text"}).response_format) is None


@pytest.mark.parametrize(("prompt", "expected"), [
    ("hello", ["hello"]), ([5, 6, 7], [[5, 6, 7]]), (["a", "b c"], ["a", "b c"]), ([[1, 2], [3]], [[1, 2], [3]]),
])  # fmt: skip
def test_completion_prompt_shapes(prompt: Any, expected: list[Any]) -> None:
    assert completion_prompts(prompt) == expected


@pytest.mark.parametrize(("prompt", "param"), [
    ("", "prompt"), ([], "prompt"), ([1, "a"], "prompt[1]"), (["a", [1]], "prompt[1]"), ([["x"]], "prompt[0][0]"),
    ([[1], [2, 3.5]], "prompt[1][1]"), ([None], "prompt[0]"), (["a", ""], "prompt[1]"), ([False, 1], "prompt[0]"),
])  # fmt: skip
def test_bad_prompts_name_the_element(prompt: Any, param: str) -> None:
    assert refusal(completion_prompts, prompt).param == param


def test_template_messages_with_tool_calls() -> None:
    req = chat(messages=[
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C", "name": "get_weather"},
    ])  # fmt: skip
    assert template_messages(req.messages) == [
        {"role": "user", "content": "Weather\nin Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21 C", "name": "get_weather", "tool_call_id": "call_1"},
    ]  # fmt: skip


def test_assistant_tool_calls_without_content() -> None:
    """Clients dump the assistant message with exclude_none: no `content` key at all."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    [message] = template_messages(chat(messages=[{"role": "assistant", "tool_calls": [call]}]).messages)
    assert message["content"] == "" and message["tool_calls"][0]["function"] == {"name": "f", "arguments": {}}


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
     "messages[0].tool_calls"),
    ({"role": "tool", "content": "21 C"}, "messages[0].tool_call_id"),
    ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages[0].tool_call_id"),
    ({"role": "user", "content": None}, "messages[0].content"),
])  # fmt: skip
def test_bad_messages(message: dict[str, Any], param: str) -> None:
    assert refusal(template_messages, chat(messages=[message]).messages).param == param


def test_tool_plan() -> None:
    hermes_template = "{{ tools }} <tool_call>"
    plan = tool_plan(chat(tools=[TOOL]), hermes_template, True, None)
    assert isinstance(plan.parser, HermesParser) and plan.parallel
    assert plan.tools == [TOOL]  # OpenAI's shape, unset fields (strict) left out
    assert isinstance(tool_plan(chat(tools=[TOOL]), "{{ tools }}", True, "mistral").parser, MistralParser)
    assert not tool_plan(chat(tools=[TOOL], parallel_tool_calls=False), hermes_template, True, None).parallel
    none = tool_plan(chat(tools=[TOOL], tool_choice="none"), hermes_template, True, None)
    assert none.tools is None and none.parser is None  # not shown to the model, not looked for
    assert tool_plan(chat(), hermes_template, True, None).parser is None


@pytest.mark.parametrize(("fields", "template", "uses_tools", "param", "words"), [
    ({"tool_choice": "auto"}, "<tool_call>", True, "tool_choice", "needs tools"),
    ({"tools": [TOOL]}, "{{ messages }}", False, "tools", "does not render tools"),
    ({"tools": [TOOL]}, "{{ tools }}", True, "tools", "--tool-call-parser"),
    ({"tools": [TOOL, TOOL]}, "<tool_call>", True, "tools[1].function.name", "two tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "<tool_call>", True,
     "tools[0].function.name", "letters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "<tool_call>",
     True, "tools[0].function.parameters", "object"),
])  # fmt: skip
def test_tool_plan_refusals(fields: dict[str, Any], template: str, uses_tools: bool, param: str, words: str) -> None:
    e = refusal(tool_plan, chat(**fields), template, uses_tools, None)
    assert e.param == param and words in e.message


STRICT_TOOL = {"type": "function", "function": {**TOOL["function"], "strict": True}}


@pytest.mark.parametrize(("fields", "mode"), [
    ({"tools": [TOOL], "tool_choice": "required"}, "required"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "named"),
    ({"tools": [STRICT_TOOL]}, "auto"), ({"tools": [STRICT_TOOL], "tool_choice": "auto"}, "auto"),
    ({"tools": [TOOL]}, None), ({"tools": [STRICT_TOOL], "tool_choice": "none"}, None),
])  # fmt: skip
def test_constrained_tool_choices_are_planned(fields: dict[str, Any], mode: str | None) -> None:
    """tool_choice required / named and strict functions were refused until constrained decoding (issue 13)."""
    req = chat(**fields)
    plan = tool_plan(req, "{{ tools }} <tool_call>", True, None)
    spec = tool_call_spec(req, plan.parser.syntax, plan.tools, plan.parallel, lambda _: None) if plan.parser else None
    if mode is None:
        assert spec is None
        return
    assert spec is not None and spec.kind == "lark" and '"const": "get_weather"' in (spec.lark or "")
    assert tool_mode(req, [t["function"] for t in plan.tools or []])[0] == mode  # type: ignore[index]


def test_openapi_document_is_valid_and_complete() -> None:
    doc = openapi_document("9.9.9")
    assert doc["openapi"].startswith("3.") and doc["info"]["version"] == "9.9.9"
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert set(doc["paths"]) == {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}",
                                 "/tokenize", "/detokenize", "/version", "/openapi.json", "/health", "/metrics"}
    chat_schema = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert chat_schema["additionalProperties"] is False and chat_schema["required"] == ["messages"]
    assert {"tools", "tool_choice", "parallel_tool_calls", "response_format"} <= set(chat_schema["properties"])
    # The schemas say what the server decodes: a valid body validates, a misspelled field does not.
    root = {"components": doc["components"], "$ref": "#/components/schemas/ChatCompletionRequest"}
    validator = jsonschema.Draft202012Validator(root)
    assert validator.is_valid({"messages": MSG, "tools": [TOOL], "tool_choice": "auto"})
    assert not validator.is_valid({"messages": MSG, "temprature": 1})
    completion_schema = doc["components"]["schemas"]["CompletionRequest"]
    prompt_validator = jsonschema.Draft202012Validator(completion_schema["properties"]["prompt"])
    assert all(prompt_validator.is_valid(p) for p in ["x", ["a", "b"], [1, 2], [[1], [2, 3]]])
    assert not prompt_validator.is_valid({"a": 1})

