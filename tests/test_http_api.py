"""The OpenAI surface beyond plain generation, against a FakeEngine over real uvicorn: batched
prompts, tools and tool-call parsing, the small routes, CORS, unknown fields."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fake_engine import BOS, FakeEngine, serve
from helpers import wait_for

from aioffload import __version__
from aioffload.config import ServerConfig
from aioffload.serving.app import build_app

MODEL = "fake-model"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
HERMES_CALL = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(model_name=MODEL, max_model_len=256)


@pytest.fixture(scope="module")
def base_url(engine: FakeEngine) -> Iterator[str]:
    with serve(build_app(engine, ServerConfig())) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def scripted(text: str, parser: str | None = None) -> Any:
    """A server whose engine "samples" `text` (FakeTokenizer ids), then EOS."""
    engine = FakeEngine(model_name=MODEL, max_model_len=512)
    engine.script = engine.tokenizer.encode(text, add_special_tokens=False)
    return engine, serve(build_app(engine, ServerConfig(tool_call_parser=parser)))


# ---- batched prompts ----


def test_batched_string_prompts(oai: openai.OpenAI, engine: FakeEngine) -> None:
    prompts = ["Hello", "Bonjour tout le monde", "Hallo"]
    out = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=5)
    ids = [engine.tokenizer.encode(p) for p in prompts]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [engine.expected_text(i, 5) for i in ids]
    assert out.usage.prompt_tokens == sum(map(len, ids)) and out.usage.completion_tokens == 15
    assert out.usage.total_tokens == out.usage.prompt_tokens + 15
    rids = [call[2] for call in engine.calls[-3:]]
    assert rids == [f"{out.id}-{i}" for i in range(3)]  # one engine request per prompt


def test_batched_token_prompts_stream(oai: openai.OpenAI, engine: FakeEngine) -> None:
    prompts = [[72, 105], [1, 2, 3, 4], [200]]
    full = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=4, stop=["zzz"])
    chunks = list(oai.completions.create(model=MODEL, prompt=prompts, max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)}
    assert texts == {c.index: c.text for c in full.choices} == {i: engine.expected_text(p, 4)
                                                                for i, p in enumerate(prompts)}
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices
                and c.choices[0].finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length"), (2, "length")]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert len({c.id for c in chunks}) == 1


def test_batched_prompts_run_concurrently() -> None:
    engine = FakeEngine(model_name=MODEL, token_delay_s=0.02, max_running=8)
    with serve(build_app(engine, ServerConfig())) as url:
        seen = []
        body = {"prompt": ["a", "b", "c", "d"], "max_tokens": 10, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen.append(len(engine.running))
        assert max(seen) == 4  # all four held KV at once: they ran side by side, not one after another


def test_batch_refused_as_a_whole_when_one_prompt_cannot_run() -> None:
    engine = FakeEngine(model_name=MODEL, max_running=2, token_delay_s=0.01)
    with serve(build_app(engine, ServerConfig())) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 20}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert engine.running == {}  # the two admitted were aborted: their blocks are back
        assert len(engine.aborted) == 2


def test_batched_stream_disconnect_aborts_every_prompt() -> None:
    engine = FakeEngine(model_name=MODEL, token_delay_s=0.02)
    with serve(build_app(engine, ServerConfig())) as url:
        body = {"prompt": ["a", "b", "c"], "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as r:
            lines = r.iter_lines()
            assert sum(next(lines).startswith("data: {") for _ in range(8)) >= 3
        assert wait_for(lambda: not engine.running, timeout=5)
        assert len(set(engine.aborted)) == 3


@pytest.mark.parametrize(("prompt", "param"), [(["ok", "x" * 300], "prompt[1]"), ([[1, 2], [1, 999]], "prompt[1]")])
def test_batched_prompt_errors_name_the_prompt(client: httpx.Client, prompt: list[Any], param: str) -> None:
    r = client.post("/v1/completions", json={"prompt": prompt})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


# ---- tools ----


def test_tools_are_rendered_and_calls_parsed() -> None:
    engine, server = scripted(HERMES_CALL)
    with server as url:
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        out = oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[TOOL])  # type: ignore[list-item]
        prompt = engine.tokenizer.decode(engine.calls[-1][0])
        assert prompt.startswith(f"<tools>{json.dumps([TOOL])}</tools>\n")  # the template got the tools
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking.\n"
        [call] = choice.message.tool_calls  # type: ignore[misc]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "Paris"}

        chunks = list(oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[TOOL], stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == "Checking.\n"
        [streamed] = [tc for d in deltas for tc in d.tool_calls or []]
        assert (streamed.index, streamed.function.name, streamed.function.arguments) == (
            0, "get_weather", call.function.arguments)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_neither_renders_nor_parses() -> None:
    engine, server = scripted(HERMES_CALL)
    with server as url:
        body = {"messages": MESSAGES, "tools": [TOOL], "tool_choice": "none"}
        out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).json()
        assert "<tools>" not in engine.tokenizer.decode(engine.calls[-1][0])
        assert out["choices"][0]["message"] == {"role": "assistant", "content": HERMES_CALL}
        assert out["choices"][0]["finish_reason"] == "stop"


def test_no_tools_means_no_parsing() -> None:
    engine, server = scripted(HERMES_CALL)
    with server as url:
        out = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=10).json()
        assert out["choices"][0]["message"]["content"] == HERMES_CALL and "tool_calls" not in out["choices"][0]


def test_mistral_marker_is_a_special_token_kept_for_tool_parsing() -> None:
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", ' \
           '"arguments": {"city": "Lyon"}}]'
    engine, server = scripted(text, parser="mistral")
    assert 257 in engine.script  # [TOOL_CALLS] is one special id: in the text of tool-parsing requests only
    with server as url:
        body = {"messages": MESSAGES, "tools": [TOOL]}
        out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).json()
        message = out["choices"][0]["message"]
        assert message["content"] is None and out["choices"][0]["finish_reason"] == "tool_calls"
        assert [json.loads(c["function"]["arguments"])["city"] for c in message["tool_calls"]] == ["Paris", "Lyon"]
        assert all(len(c["id"]) == 9 for c in message["tool_calls"])
        one = httpx.post(f"{url}/v1/chat/completions", json={**body, "parallel_tool_calls": False}, timeout=10).json()
        assert len(one["choices"][0]["message"]["tool_calls"]) == 1


def test_earlier_tool_calls_and_results_reach_the_template() -> None:
    engine, server = scripted("It is 21 C in Paris.")
    with server as url:
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        function = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        call = {"id": "call_1", "type": "function", "function": function}
        messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
        out = oai.chat.completions.create(model=MODEL, messages=messages, tools=[TOOL])  # type: ignore[arg-type]
        assert out.choices[0].message.content == "It is 21 C in Paris." and out.choices[0].finish_reason == "stop"
        prompt = engine.tokenizer.decode(engine.calls[-1][0])
        rendered = {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        assert f"<assistant><call>{json.dumps(rendered)}</call>\n<tool>21 C\n" in prompt


BARE_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_required_and_named_are_constrained(tool_choice: Any) -> None:
    """Once refused until constrained decoding was wired (issue 13): now a grammar in Hermes' format."""
    engine, server = scripted(HERMES_CALL)  # the model would write content first: the grammar forbids it
    with server as url:
        body = {"messages": MESSAGES, "tools": [TOOL], "tool_choice": tool_choice, "max_tokens": 13}
        out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).json()
        assert out["choices"][0]["message"]["content"] == "<tool_call>\n{"  # forced, then cut at 13 tokens
        mask = engine.calls[-1][1].logits_mask
        assert mask is not None and mask() is not mask()  # one provider per sequence
        engine.script = engine.tokenizer.encode(BARE_CALL, add_special_tokens=False)
        out = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 200}, timeout=10).json()
        [call] = out["choices"][0]["message"]["tool_calls"]
        assert out["choices"][0]["finish_reason"] == "tool_calls" and call["function"]["name"] == "get_weather"
        provider = engine.calls[-1][1].logits_mask()
        for t in engine.tokenizer.encode('<tool_call>\n{"name": "get_', add_special_tokens=False):
            provider.accept(t)
        with pytest.raises(RuntimeError, match="rejected"):  # get_time is no tool of this request
            provider.accept(engine.tokenizer.encode("t", add_special_tokens=False)[0])


def test_unknown_named_function_is_a_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[TOOL],  # type: ignore[list-item]
                                    tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert e.value.body["param"] == "tool_choice.function.name"  # type: ignore[index]


# ---- unknown fields, and the fields that once were refused ----


def test_unknown_fields_are_400s(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"temprature": 0.1})  # type: ignore
    assert e.value.body["param"] == "temprature"  # type: ignore[index]


def test_fields_once_refused_reach_the_engine(base_url: str, engine: FakeEngine) -> None:
    """logit_bias, frequency_penalty and response_format were 400s until issue 13's second half."""
    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)
    oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, logit_bias={"5": 10, "42": -100},  # type: ignore
                                frequency_penalty=0.5, presence_penalty=-1, extra_body={"repetition_penalty": 1.3,
                                                                                        "min_tokens": 1})
    p = engine.calls[-1][1]
    assert p.logit_bias == ((5, 10.0), (42, -100.0)) and (p.frequency_penalty, p.presence_penalty) == (0.5, -1.0)
    assert (p.repetition_penalty, p.min_tokens, p.logits_mask) == (1.3, 1, None)


def test_response_format_json_object() -> None:
    engine, server = scripted('{"a": [1, 2]}')
    with server as url:
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        out = oai.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"})  # type: ignore
        assert json.loads(out.choices[0].message.content or "") == {"a": [1, 2]}
        assert out.choices[0].finish_reason == "stop"
        compiler_fill = engine.worker.fill_masks
        assert compiler_fill is not None and compiler_fill.__name__ == "fill_bitmasks"  # the worker uses llguidance's
        engine.script = engine.tokenizer.encode("Sure! {}", add_special_tokens=False)
        forced = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,  # type: ignore
                                             response_format={"type": "json_object"})
        assert forced.choices[0].message.content == "{"  # "S" is not JSON: the mask allowed only "{"


def test_neutral_and_informational_fields_are_accepted(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=1, presence_penalty=0,  # type: ignore
                                      frequency_penalty=0, logprobs=False, user="u", store=False,
                                      metadata={"team": "a"}, service_tier="auto", parallel_tool_calls=True)
    assert out.choices[0].finish_reason == "length"


# ---- small routes ----


def test_models_retrieve(oai: openai.OpenAI, client: httpx.Client) -> None:
    card = oai.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "aioffload")
    assert client.get(f"/v1/models/{MODEL}").json() == client.get("/v1/models").json()["data"][0]
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")
    r = client.get("/v1/models/org/other-model")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_tokenize_and_detokenize(client: httpx.Client, engine: FakeEngine) -> None:
    r = client.post("/tokenize", json={"prompt": "Hi!"}).json()
    assert r == {"count": 4, "max_model_len": 256, "tokens": [BOS, 72, 105, 33], "token_strs": None}
    bare = client.post("/tokenize", json={"prompt": "Hi!", "add_special_tokens": False, "return_token_strs": True})
    assert bare.json()["tokens"] == [72, 105, 33] and bare.json()["token_strs"] == ["H", "i", "!"]
    chat = client.post("/tokenize", json={"messages": MESSAGES, "tools": [TOOL]}).json()
    rendered = engine.tokenizer.apply_chat_template(MESSAGES, True, [TOOL])
    assert chat["tokens"] == engine.tokenizer.encode(rendered, add_special_tokens=False)
    assert client.post("/detokenize", json={"tokens": [BOS, 72, 105]}).json() == {"prompt": "<s>Hi"}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
    ("/tokenize", {"prompt": "a", "tools": [TOOL]}, "tools"), ("/tokenize", {"prompt": 3}, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model"), ("/tokenize", {"prompt": "a", "x": 1}, "x"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"), ("/detokenize", {"tokens": []}, "tokens"),
    ("/detokenize", {}, "tokens"),
])  # fmt: skip
def test_tokenize_errors(client: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param


def test_version_and_openapi(client: httpx.Client) -> None:
    assert client.get("/version").json() == {"version": __version__}
    doc = client.get("/openapi.json").json()
    assert doc["info"]["version"] == __version__ and "/v1/chat/completions" in doc["paths"]


def test_auth_covers_tokenize_but_not_version_and_openapi(engine: FakeEngine) -> None:
    with serve(build_app(engine, ServerConfig(api_key="k"))) as url:
        assert httpx.post(f"{url}/tokenize", json={"prompt": "a"}).status_code == 401
        authorized = httpx.post(f"{url}/tokenize", json={"prompt": "a"}, headers={"Authorization": "Bearer k"})
        assert authorized.status_code == 200
        assert httpx.get(f"{url}/v1/models/{MODEL}").status_code == 401
        assert httpx.get(f"{url}/version").status_code == 200 and httpx.get(f"{url}/openapi.json").status_code == 200


# ---- CORS ----


def test_cors_off_by_default(client: httpx.Client) -> None:
    r = client.options("/v1/chat/completions", headers={"Origin": "https://app.example.com",
                                                         "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": "https://x.example"}).headers


def test_cors_allowed_origins(engine: FakeEngine) -> None:
    with serve(build_app(engine, ServerConfig(allowed_origins=("https://app.example.com",), api_key="k"))) as url:
        preflight = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200  # answered before auth: a preflight carries no key
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "https://app.example.com", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        other = httpx.options(f"{url}/v1/models", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "GET"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
