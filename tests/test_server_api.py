"""The OpenAI surface of issue 13 against the real `aioffload serve`, with the official client:
batched prompts, model retrieval, tokenize/detokenize, version, openapi.json, unknown and
unimplemented fields, CORS, and tools on a tiny checkpoint that has learnt one tool call (with
tool_choice required, a named function and strict functions under their grammar). The sampler
fields' values: test_server_sampling.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from server_proc import DEMO, ServerProc, start_server
from tool_model import TOOL_CALL_TEXT, TOOL_MESSAGES, TOOLS, make_tool_model

import aioffload

NAME = "demo"
PROMPTS = ["The Python tutorial", "A list is", "Modules are"]
ORIGIN = "https://app.example.com"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProc]:
    with start_server("--max-model-len", "512", model=DEMO) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# ---- batched prompts ----


def test_batched_prompts_equal_one_by_one(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": NAME, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = [oai.completions.create(prompt=p, **kw) for p in PROMPTS]  # type: ignore[call-overload]
    batch = oai.completions.create(prompt=PROMPTS, **kw)  # type: ignore[call-overload]
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 36 and batch.usage.total_tokens == batch.usage.prompt_tokens + 36


def test_batched_token_prompts_streamed(oai: openai.OpenAI, client: httpx.Client) -> None:
    ids = [client.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in PROMPTS]
    kw: dict[str, Any] = {"model": NAME, "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = oai.completions.create(prompt=ids, **kw)  # type: ignore[call-overload]
    by_text = oai.completions.create(prompt=PROMPTS, **kw)  # type: ignore[call-overload]
    assert [c.text for c in full.choices] == [c.text for c in by_text.choices]
    chunks = list(oai.completions.create(prompt=ids, stream=True, stream_options={"include_usage": True},  # type: ignore
                                         **kw))
    for i in range(3):
        streamed = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert streamed == full.choices[i].text
    assert chunks[-1].usage == full.usage


def test_kv_blocks_return_after_a_batch(client: httpx.Client) -> None:
    body = {"model": NAME, "prompt": PROMPTS * 3, "max_tokens": 5, "temperature": 0}
    assert len(client.post("/v1/completions", json=body).json()["choices"]) == 9
    metrics = client.get("/metrics").text
    free = next(line for line in metrics.splitlines() if line.startswith("aioffload_kv_blocks_free "))
    total = next(line for line in metrics.splitlines() if line.startswith("aioffload_kv_blocks_total "))
    assert free.split()[1] == total.split()[1]


# ---- the small routes ----


def test_models_retrieve(oai: openai.OpenAI) -> None:
    card = oai.models.retrieve(NAME)
    assert card.id == NAME and card.owned_by == "aioffload"
    assert card.model_extra["max_model_len"] == 512  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")


def test_tokenize_detokenize_agree_with_generation(oai: openai.OpenAI, client: httpx.Client) -> None:
    tok = client.post("/tokenize", json={"prompt": PROMPTS[0], "return_token_strs": True}).json()
    out = oai.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=1)
    assert tok["count"] == len(tok["tokens"]) == out.usage.prompt_tokens and tok["max_model_len"] == 512
    assert "".join(tok["token_strs"]) == "<|bos|>" + PROMPTS[0]
    assert client.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "<|bos|>" + PROMPTS[0]}
    messages = [{"role": "user", "content": "What is a list?"}]
    chat = oai.chat.completions.create(model=NAME, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    assert client.post("/tokenize", json={"messages": messages}).json()["count"] == chat.usage.prompt_tokens
    assert client.post("/detokenize", json={"tokens": [10**6]}).status_code == 400


def test_version_and_openapi(client: httpx.Client) -> None:
    assert client.get("/version").json() == {"version": aioffload.__version__}
    doc = client.get("/openapi.json").json()
    assert doc["openapi"] == "3.1.0" and "/v1/models/{model_id}" in doc["paths"]
    assert "prompt" in doc["components"]["schemas"]["CompletionRequest"]["required"]


# ---- fields ----


@pytest.mark.parametrize(("extra", "param"), [
    ({"temprature": 0.2}, "temprature"), ({"suffix": "!"}, "suffix"), ({"min_p": 0.1}, "min_p"),
])  # fmt: skip
def test_completion_fields_unknown_or_unimplemented(oai: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param  # type: ignore[index]


def test_completion_fields_once_refused_now_work(oai: openai.OpenAI, client: httpx.Client) -> None:
    """presence_penalty, logit_bias, n, best_of, echo, logprobs and min_tokens were 400s until issue 13's
    sampler half; each now does what it says (test_server_sampling.py checks the values)."""
    kw: dict[str, Any] = {"model": NAME, "prompt": "The new module", "max_tokens": 12, "temperature": 0,
                          "extra_body": {"ignore_eos": True}}
    plain = oai.completions.create(**kw).choices[0]
    assert oai.completions.create(**kw, presence_penalty=2).choices[0].text != plain.text
    assert oai.completions.create(**kw, logit_bias={"42": 100}).choices[0].text == \
        client.post("/detokenize", json={"tokens": [42] * 12}).json()["prompt"]
    assert [c.text for c in oai.completions.create(**kw, n=2).choices] == [plain.text] * 2  # greedy: alike
    assert oai.completions.create(**kw, best_of=2).choices[0].text == plain.text
    echoed = oai.completions.create(**kw, echo=True, logprobs=1).choices[0]
    assert echoed.text == "The new module" + plain.text and echoed.logprobs.token_logprobs[0] is None
    assert len(echoed.logprobs.tokens) == len(client.post("/tokenize", json={"prompt": "The new module"}).json()[
        "tokens"]) + 12
    held = oai.completions.create(model=NAME, prompt="The new module", max_tokens=12, temperature=0,
                                  logit_bias={"1": 40}, extra_body={"min_tokens": 3})  # eos (id 1) pushed first
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),  # the demo template shows no tools
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"modalities": ["audio"]}, "modalities"),
])  # fmt: skip
def test_chat_fields_refused(oai: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    extra_body=extra)  # fmt: skip
    assert e.value.body["param"] == param  # type: ignore[index]


def test_chat_fields_once_refused_now_work(oai: openai.OpenAI) -> None:
    """response_format json_schema, logprobs with top_logprobs and frequency_penalty were 400s (issue 13)."""
    messages = [{"role": "user", "content": "hi"}]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    out = oai.chat.completions.create(model=NAME, messages=messages, max_tokens=20, response_format=fmt,  # type: ignore
                                      logprobs=True, top_logprobs=2, frequency_penalty=-0.5, temperature=0)
    assert isinstance(json.loads(out.choices[0].message.content or "")["ok"], bool)
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)


def test_informational_and_neutral_fields_accepted(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                      user="u", store=False, metadata={"k": "v"}, n=1, presence_penalty=0,
                                      frequency_penalty=0, logprobs=False, response_format={"type": "text"})
    assert out.usage.completion_tokens >= 1


# ---- tools, on a model that learnt one call; CORS on the same server ----


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    model = make_tool_model(tmp_path_factory.mktemp("tools"))
    with start_server("--allowed-origins", ORIGIN, model=str(model)) as s:
        yield s


@pytest.fixture(scope="module")
def tool_oai(tool_server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_tool_call_returned(tool_oai: openai.OpenAI) -> None:
    out = tool_oai.chat.completions.create(model="tool-model", messages=TOOL_MESSAGES, tools=TOOLS,  # type: ignore
                                           temperature=0, max_tokens=64)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls  # type: ignore[misc]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")


def test_tool_call_streamed(tool_oai: openai.OpenAI) -> None:
    chunks = list(tool_oai.chat.completions.create(model="tool-model", messages=TOOL_MESSAGES, tools=TOOLS,  # type: ignore
                                                   temperature=0, max_tokens=64, stream=True))
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_gives_text(tool_oai: openai.OpenAI, tool_server: ServerProc) -> None:
    out = tool_oai.chat.completions.create(model="tool-model", messages=TOOL_MESSAGES, tools=TOOLS,  # type: ignore
                                           tool_choice="none", temperature=0, max_tokens=16)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
    plain = httpx.post(f"{tool_server.url}/tokenize", json={"messages": TOOL_MESSAGES}).json()["count"]
    assert out.usage.prompt_tokens == plain  # tools left out of the prompt


BOUNDED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}}, "required": ["tz"],
        "additionalProperties": False}}},
]  # fmt: skip
QUESTIONS = ["What is the weather in Paris?", "Tell me a joke.", "hello", "What time is it in Berlin?"]


def valid_calls(message: Any, tools: list[dict[str, Any]]) -> list[str]:
    """The names of the message's calls, each checked against its tool's parameters schema."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in message.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    return [call.function.name for call in message.tool_calls or []]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_tool_choices_always_yield_a_parseable_call(tool_oai: openai.OpenAI,
                                                                       tool_choice: Any) -> None:
    """Sampled at temperature 1 on questions the model never saw (it learnt one weather call): the
    grammar still makes every reply one call that parses and follows its tool's schema."""
    names = []
    for seed, question in enumerate(QUESTIONS * 2):
        out = tool_oai.chat.completions.create(model="tool-model", messages=[{"role": "user", "content": question}],  # type: ignore
                                               tools=BOUNDED_TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
                                               temperature=1.0, seed=seed, max_tokens=200)  # fmt: skip
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
        names += valid_calls(choice.message, BOUNDED_TOOLS)
    assert len(names) == 8
    if tool_choice != "required":
        assert set(names) == {"get_time"}
    chunks = list(tool_oai.chat.completions.create(model="tool-model", messages=TOOL_MESSAGES, tools=TOOLS,  # type: ignore
                                                   tool_choice=tool_choice if tool_choice == "required" else
                                                   {"type": "function", "function": {"name": "get_weather"}},
                                                   temperature=0, max_tokens=64, stream=True))  # fmt: skip
    [call] = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # what the model learnt, within the grammar


def test_strict_functions_constrain_the_calls_the_model_makes(tool_oai: openai.OpenAI) -> None:
    """tool_choice auto: the model may answer in text, but a `<tool_call>` it opens holds a valid call of a
    strict function; greedy on the trained prompt gives the learnt call."""
    strict = [{"type": "function", "function": {**t["function"], "strict": True}} for t in BOUNDED_TOOLS]
    for seed, question in enumerate(QUESTIONS * 2):
        out = tool_oai.chat.completions.create(model="tool-model", messages=[{"role": "user", "content": question}],  # type: ignore
                                               tools=strict, temperature=1.0, seed=seed, max_tokens=200)
        choice = out.choices[0]
        valid_calls(choice.message, strict)
        assert "<tool_call>" not in (choice.message.content or ""), choice  # never a call that failed to parse
    learnt = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    out = tool_oai.chat.completions.create(model="tool-model", messages=TOOL_MESSAGES, temperature=0, max_tokens=64,  # type: ignore
                                           tools=learnt)
    [call] = out.choices[0].message.tool_calls  # type: ignore[misc]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_results_go_back_through_the_template(tool_oai: openai.OpenAI, tool_server: ServerProc) -> None:
    first = tool_oai.chat.completions.create(model="tool-model", messages=TOOL_MESSAGES, tools=TOOLS,  # type: ignore
                                             temperature=0, max_tokens=64)
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    messages = [*TOOL_MESSAGES, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"}]
    second = tool_oai.chat.completions.create(model="tool-model", messages=messages, tools=TOOLS,  # type: ignore
                                              temperature=0, max_tokens=8)
    rendered = httpx.post(f"{tool_server.url}/tokenize", json={"messages": messages, "tools": TOOLS}).json()
    assert second.usage.prompt_tokens == rendered["count"]
    text = httpx.post(f"{tool_server.url}/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"]
    assert TOOL_CALL_TEXT in text and "<tool_response>\n21 C, sunny\n</tool_response>" in text


def test_cors(tool_server: ServerProc, server: ServerProc) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(f"{tool_server.url}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    got = httpx.get(f"{tool_server.url}/v1/models", headers={"Origin": ORIGIN})
    assert got.headers["access-control-allow-origin"] == ORIGIN
    off = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)  # started without the flag
    assert "access-control-allow-origin" not in off.headers
