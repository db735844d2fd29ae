"""HTTP API against a FakeEngine, over real uvicorn on a loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fake_engine import FakeEngine, fake_logprob, serve
from helpers import wait_for

from aioffload.config import EngineConfig, ServerConfig
from aioffload.serving.app import build_app, run_server

MODEL = "fake-model"
MAX_BODY = 8192


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(model_name=MODEL, max_model_len=256)


@pytest.fixture(scope="module")
def base_url(engine: FakeEngine) -> Iterator[str]:
    with serve(build_app(engine, ServerConfig(max_body_bytes=MAX_BODY))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def slow() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine(model_name=MODEL, token_delay_s=0.05, max_running=1)
    with serve(build_app(engine, ServerConfig())) as url:
        yield engine, url


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into event payloads, checking the `data: ...\\n\\n` framing."""
    parts = raw.split(b"\n\n")
    assert parts[-1] == b"", "the stream must end with a blank line"
    assert all(p.startswith(b"data: ") for p in parts[:-1]), parts
    return [p[len(b"data: "):] for p in parts[:-1]]


def chat_prompt_ids(engine: FakeEngine, messages: list[dict[str, str]]) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages), add_special_tokens=False)


# ---- OpenAI client: streamed text == non-streamed text ----


def test_openai_completions(oai: openai.OpenAI, engine: FakeEngine) -> None:
    expected = engine.expected_text(engine.tokenizer.encode("Hello"), 8)
    full = oai.completions.create(model=MODEL, prompt="Hello", max_tokens=8)
    assert full.choices[0].text == expected
    assert full.choices[0].finish_reason == "length"
    assert full.id.startswith("cmpl-") and full.object == "text_completion" and full.model == MODEL
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (6, 8, 14)
    chunks = list(oai.completions.create(model=MODEL, prompt="Hello", max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_chat(oai: openai.OpenAI, engine: FakeEngine) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi there"}]
    expected = engine.expected_text(chat_prompt_ids(engine, messages), 5)
    full = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5)  # type: ignore
    assert full.choices[0].message.content == expected
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 5
    stream = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, stream=True,  # type: ignore
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []


def test_stop_string_and_token_prompt(oai: openai.OpenAI, engine: FakeEngine) -> None:
    ids = [72, 105, 33]
    words = engine.expected_text(ids, 6).split(" ")[1:]
    out = oai.completions.create(model=MODEL, prompt=ids, max_tokens=6, stop=[words[2]])
    assert out.choices[0].text == " " + " ".join(words[:2]) + " "
    assert out.choices[0].finish_reason == "stop"
    assert engine.calls[-1][0] == ids


def test_sampling_params_reach_engine(client: httpx.Client, engine: FakeEngine) -> None:
    body = {"model": MODEL, "prompt": "x", "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 7,
            "stop": "zzz", "user": "ignored", "presence_penalty": 0}
    assert client.post("/v1/completions", json=body).status_code == 200
    params = engine.calls[-1][1]
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 5, 7)
    assert params.stop == ("zzz",) and params.max_tokens == 16  # completions default
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert client.post("/v1/chat/completions", json={"messages": messages}).status_code == 200
    prompt_ids, params, _ = engine.calls[-1]
    assert prompt_ids == chat_prompt_ids(engine, [{"role": "user", "content": "a\nb"}])
    assert params.max_tokens == min(512, 256 - len(prompt_ids))  # chat default


def test_models(oai: openai.OpenAI, client: httpx.Client) -> None:
    assert [m.id for m in oai.models.list()] == [MODEL]
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 256


# ---- raw SSE wire format ----


def test_chat_sse_wire_format(client: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        events = sse_events(r.read())
    assert events[-1] == b"[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert len({o["id"] for o in objs}) == 1 and objs[0]["id"].startswith("chatcmpl-")
    assert len({o["created"] for o in objs}) == 1
    assert all(o["object"] == "chat.completion.chunk" and o["model"] == MODEL for o in objs)
    assert objs[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]
    assert [list(o["choices"][0]["delta"]) for o in objs[1:-2]] == [["content"]] * 4
    assert objs[-2]["choices"][0]["delta"] == {} and objs[-2]["choices"][0]["finish_reason"] == "length"
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 4
    assert objs[-1]["usage"]["total_tokens"] == objs[-1]["usage"]["prompt_tokens"] + 4
    assert all("usage" in o and o["usage"] is None for o in objs[:-1])


def test_completion_sse_wire_format(client: httpx.Client) -> None:
    body = {"prompt": "abc", "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r.read())
    assert events[-1] == b"[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert len({(o["id"], o["created"]) for o in objs}) == 1 and objs[0]["id"].startswith("cmpl-")
    assert all(o["object"] == "text_completion" and "usage" not in o for o in objs)
    assert [o["choices"][0]["finish_reason"] for o in objs] == [None, None, None, "length"]
    assert all(o["choices"][0]["logprobs"] is None for o in objs)


# ---- malformed requests: 4xx with an OpenAI error object naming the field ----

C, H = "/v1/completions", "/v1/chat/completions"
P = {"model": MODEL, "prompt": "hi"}
M = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def msg(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [fields]}


BAD: list[tuple[str, Any, int, str | None]] = [
    (C, b"", 400, None), (C, b"{", 400, None), (C, b"not json", 400, None), (C, b"[]", 400, None),
    (C, b"null", 400, None), (C, b'"text"', 400, None), (C, b"\xff\xfe", 400, None),
    (C, {}, 400, "prompt"), (C, {"prompt": 5}, 400, "prompt"), (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"), (C, {"prompt": ["a", 1]}, 400, "prompt[1]"),
    (C, {"prompt": [[1], "a"]}, 400, "prompt[1]"), (C, {"prompt": [[1, "x"]]}, 400, "prompt[0][1]"),
    (C, {"prompt": [[1], []]}, 400, "prompt[1]"), (C, {"prompt": [True]}, 400, "prompt[0]"),
    (C, {"prompt": [{"a": 1}]}, 400, "prompt[0]"), (C, {"prompt": ["a", "x" * 300]}, 400, "prompt[1]"),
    (C, {"prompt": [[1], [1, 100000]]}, 400, "prompt[1]"),
    (C, {"prompt": [1, -1]}, 400, "prompt"), (C, {"prompt": [1, 100000]}, 400, "prompt"),
    (C, {"prompt": [1, 2.5]}, 400, "prompt[1]"), (C, {"prompt": None}, 400, "prompt"),
    (C, {**P, "model": "other"}, 404, "model"), (C, {**P, "model": 3}, 400, "model"),
    (C, {**P, "max_tokens": 0}, 400, "max_tokens"), (C, {**P, "max_tokens": -5}, 400, "max_tokens"),
    (C, {**P, "max_tokens": "10"}, 400, "max_tokens"), (C, {**P, "max_tokens": 1.5}, 400, "max_tokens"),
    (C, {**P, "max_tokens": 300}, 400, "max_tokens"), (C, {**P, "max_tokens": 2**70}, 400, "max_tokens"),
    (C, {**P, "temperature": -0.1}, 400, "temperature"), (C, {**P, "temperature": 2.5}, 400, "temperature"),
    (C, {**P, "temperature": "hot"}, 400, "temperature"), (C, {**P, "top_p": 0}, 400, "top_p"),
    (C, {**P, "top_p": 1.5}, 400, "top_p"), (C, {**P, "top_p": -1}, 400, "top_p"),
    (C, {**P, "top_k": -1}, 400, "top_k"), (C, {**P, "top_k": 1.5}, 400, "top_k"),
    (C, {**P, "n": 65}, 400, "n"), (C, {**P, "n": 0}, 400, "n"), (C, {**P, "stop": 5}, 400, "stop"),
    (C, {**P, "stop": [1]}, 400, "stop[0]"), (C, {**P, "stop": [""]}, 400, "stop"),
    (C, {**P, "stop": ["a"] * 17}, 400, "stop"), (C, {**P, "echo": 1}, 400, "echo"),
    (C, {**P, "logprobs": 21}, 400, "logprobs"), (C, {**P, "stream": "yes"}, 400, "stream"),
    (C, {**P, "stream_options": 3}, 400, "stream_options"),
    (C, {**P, "stream_options": {"include_usage": "y"}}, 400, "stream_options.include_usage"),
    (C, {**P, "seed": "x"}, 400, "seed"), (C, {**P, "seed": 2**64}, 400, "seed"),
    (C, {**P, "prompt": "x" * 300}, 400, "prompt"),
    (C, {**P, "prompt": "x" * 250, "max_tokens": 10}, 400, "max_tokens"),
    (C, {**P, "prompt": "x" * (MAX_BODY + 10)}, 413, None),
    (C, {**P, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (C, {**P, "ignore_eos": "no"}, 400, "ignore_eos"), (C, {**P, "user": 5}, 400, "user"),
    (H, {}, 400, "messages"), (H, {"messages": []}, 400, "messages"),
    (H, {"messages": "hi"}, 400, "messages"),
    (H, msg(role="user"), 400, "messages[0].content"), (H, msg(content="x"), 400, "messages[0].role"),
    (H, msg(role="wizard", content="x"), 400, "messages[0].role"),
    (H, msg(role="user", content=5), 400, "messages[0].content"),
    (H, msg(role="user", content=[{"type": "image_url"}]), 400, "messages[0].content"),
    (H, msg(role="user", content=[{"type": "text", "text": 3}]), 400, "messages[0].content[0].text"),
    (H, {**M, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (H, {**M, "max_completion_tokens": 1000}, 400, "max_completion_tokens"),
    (H, {**M, "max_tokens": 0}, 400, "max_tokens"), (H, msg(role="user", content="x" * 300), 400, "messages"),
    (H, {**M, "logprobs": 2}, 400, "logprobs"), (H, {**M, "top_logprobs": 2}, 400, "top_logprobs"),
    (H, {**M, "temperature": 3}, 400, "temperature"), (H, {**M, "n": -1}, 400, "n"),
    (H, {**M, "model": "gpt-4"}, 404, "model"), (H, {**M, "top_p": 0.0}, 400, "top_p"),
    (H, b"{\"messages\": [", 400, None),
    # logprobs, echo, n / best_of, penalties, biases, min_tokens, structured output (issue 13): bad values
    (C, {**P, "logprobs": True}, 400, "logprobs"), (C, {**P, "logprobs": -1}, 400, "logprobs"),
    (C, {**P, "n": 2, "best_of": 1}, 400, "best_of"), (C, {**P, "best_of": 3, "stream": True}, 400, "best_of"),
    (C, {**P, "best_of": 70}, 400, "best_of"), (C, {**P, "n": 1.5}, 400, "n"),
    (H, {**M, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (C, {**P, "logit_bias": {"x": 1}}, 400, "logit_bias"), (C, {**P, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (C, {**P, "logit_bias": {"5": "up"}}, 400, "logit_bias[...]"),
    (C, {**P, "logit_bias": {"-5": 1}}, 400, "logit_bias"),
    (C, {**P, "presence_penalty": 2.5}, 400, "presence_penalty"),
    (H, {**M, "frequency_penalty": -3}, 400, "frequency_penalty"),
    (C, {**P, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {**P, "min_tokens": -1}, 400, "min_tokens"), (C, {**P, "min_tokens": 17}, 400, "min_tokens"),
    (C, {**P, "min_p": 0.1}, 400, "min_p"), (C, {**P, "suffix": "!"}, 400, "suffix"),
    (H, {**M, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    (H, {**M, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format.json_schema.schema"),
    (H, {**M, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, 400, "response_format.json_schema.schema"),
    (H, {**M, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_malformed_request(client: httpx.Client, path: str, body: Any, status: int,
                           param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert error["param"] == param and isinstance(error["message"], str) and "Traceback" not in r.text


def test_once_refused_fields_now_work(client: httpx.Client, engine: FakeEngine) -> None:
    """BAD used to hold n: 2 / echo / logprobs: 1 (completions), logprobs: true / n: 3 (chat) as 400s."""
    ids = engine.tokenizer.encode("hi")
    two = client.post(C, json={**P, "n": 2, "max_tokens": 3}).json()
    assert [(c["index"], c["text"]) for c in two["choices"]] == [(j, engine.expected_text(ids, 3, j)) for j in (0, 1)]
    assert two["usage"]["completion_tokens"] == 6 and two["usage"]["prompt_tokens"] == len(ids)
    echo = client.post(C, json={**P, "echo": True, "max_tokens": 2}).json()
    assert echo["choices"][0]["text"] == "hi" + engine.expected_text(ids, 2)
    lp = client.post(C, json={**P, "logprobs": 1, "max_tokens": 2}).json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [fake_logprob(0, len(ids) + i, 0, 1).logprob for i in range(2)]
    assert [len(t) for t in lp["top_logprobs"]] == [2, 2]  # the top 1 and the chosen token
    chat = client.post(H, json={**M, "logprobs": True, "n": 3, "max_tokens": 2}).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1, 2]
    assert all(len(c["logprobs"]["content"]) == 2 for c in chat["choices"])
    chat_len = len(engine.calls[-1][0])
    assert chat["choices"][2]["logprobs"]["content"][1]["logprob"] == fake_logprob(1, chat_len + 1, 2, 0).logprob


def test_choices_stream_interleaved_with_their_logprobs(client: httpx.Client, engine: FakeEngine) -> None:
    """n = 3 over two prompts: chunks come as the engine's steps make them (choice i * n + j), each with
    the logprobs of the tokens it brings; echo's prompt and its logprobs ride on a choice's first chunk."""
    body = {"prompt": ["ab", "c"], "n": 3, "max_tokens": 2, "stream": True, "logprobs": 1, "echo": True}
    with client.stream("POST", C, json=body) as r:
        objs = [json.loads(e) for e in sse_events(r.read())[:-1]]
    order = [(o["choices"][0]["index"], o["choices"][0]["text"]) for o in objs if o["choices"][0]["text"]]
    assert [i for i, _ in order] == [0, 3, 1, 4, 2, 5] * 2  # step by step, the two prompts side by side
    for prompt, first in (("ab", 0), ("c", 3)):
        ids = engine.tokenizer.encode(prompt)
        for j in range(3):
            mine = [o["choices"][0] for o in objs if o["choices"][0]["index"] == first + j]
            assert mine[0]["text"] == prompt + engine.expected_text(ids, 1, j)  # the echo, then token 0
            lp = mine[0]["logprobs"]
            assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids) + 1
            assert lp["token_logprobs"][1:] == [fake_logprob(t, p, 0, 1).logprob for p, t in enumerate(ids) if p] + \
                [fake_logprob(0, len(ids), j, 1).logprob]
            assert mine[1]["logprobs"]["text_offset"] == [sum(len(t) for t in lp["tokens"])]  # runs on
            assert mine[-1]["finish_reason"] == "length" and mine[-1]["logprobs"] is None


def test_oversized_chunked_body_is_413(client: httpx.Client) -> None:
    r = client.post(C, content=iter([b"x" * MAX_BODY, b"y" * 100]))  # no content-length: counted while read
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/completions").status_code == 405


# ---- disconnects, engine errors, aborts ----


def test_stream_disconnect_aborts(slow: tuple[FakeEngine, str]) -> None:
    engine, url = slow
    with httpx.Client(base_url=url, timeout=10) as c:
        with c.stream("POST", C, json={"prompt": "go", "max_tokens": 200, "stream": True}) as r:
            lines = r.iter_lines()  # keep a reference: a dropped iterator closes the response
            request_id = json.loads(next(lines)[6:])["id"]
            assert engine.kv_usage > 0
    assert wait_for(lambda: request_id in engine.aborted and engine.kv_usage == 0, timeout=1.0)
    assert not engine.running


def test_non_stream_disconnect_aborts(slow: tuple[FakeEngine, str]) -> None:
    engine, url = slow
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "go", "max_tokens": 200}, timeout=0.3)
    request_id = engine.calls[-1][2]
    assert wait_for(lambda: request_id in engine.aborted and engine.kv_usage == 0, timeout=1.0)


def test_queue_full_is_503(slow: tuple[FakeEngine, str]) -> None:
    engine, url = slow
    with httpx.Client(base_url=url, timeout=10) as c:
        with c.stream("POST", C, json={"prompt": "a", "max_tokens": 100, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            second = c.post("/v1/completions", json={"prompt": "b", "max_tokens": 5})
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "server_error"


def test_engine_abort_mid_stream(slow: tuple[FakeEngine, str]) -> None:
    engine, url = slow
    with httpx.Client(base_url=url, timeout=10) as c:
        with c.stream("POST", "/v1/chat/completions", json={**M, "max_tokens": 100, "stream": True}) as r:
            lines = r.iter_lines()
            request_id = json.loads(next(lines)[6:])["id"]
            engine.abort(request_id)  # e.g. shutdown timeout
            events = [ln[6:] for ln in lines if ln]
    assert events[-1] == "[DONE]" and "aborted" in json.loads(events[-2])["error"]["message"]


def test_engine_error_mid_stream(client: httpx.Client, engine: FakeEngine) -> None:
    engine.fail_after = 2
    try:
        with client.stream("POST", C, json={"prompt": "e", "max_tokens": 10, "stream": True}) as r:
            events = sse_events(r.read())
        r2 = client.post(C, json={"prompt": "e", "max_tokens": 10})
    finally:
        engine.fail_after = None
    assert events[-1] == b"[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
    assert len(events) == 4  # two text chunks, the error, [DONE]
    assert r2.status_code == 500 and r2.json()["error"]["message"] == "internal server error"
    assert engine.calls[-1][2] in engine.aborted and engine.kv_usage == 0


def test_health_and_metrics_stay_fast_during_slow_steps(slow: tuple[FakeEngine, str]) -> None:
    engine, url = slow
    engine.token_delay_s = 0.2
    done = threading.Event()

    def generate() -> None:
        httpx.post(f"{url}/v1/completions", json={"prompt": "s", "max_tokens": 8}, timeout=10)
        done.set()

    threading.Thread(target=generate, daemon=True).start()
    assert wait_for(lambda: bool(engine.running), timeout=1.0)
    with httpx.Client(base_url=url, timeout=5) as c:
        for path in ["/health", "/metrics"] * 5:
            t0 = time.perf_counter()
            assert c.get(path).status_code == 200
            assert time.perf_counter() - t0 < 0.1, path
    assert not done.is_set()  # the generation really was running meanwhile


# ---- auth, loading ----


def test_api_key(engine: FakeEngine) -> None:
    with serve(build_app(engine, ServerConfig(api_key="sekret"))) as url, httpx.Client(base_url=url) as c:
        for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}]:
            r = c.post(C, json=P, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["param"] is None
        assert c.get("/v1/models").status_code == 401
        assert c.post(C, json=P, headers={"authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        assert openai.OpenAI(base_url=f"{url}/v1", api_key="sekret").models.list().data[0].id == MODEL


def test_health_503_until_engine_is_set(engine: FakeEngine) -> None:
    app = build_app(None, ServerConfig())
    with serve(app) as url, httpx.Client(base_url=url) as c:
        assert c.get("/health").status_code == 503
        r = c.post(C, json=P)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert c.get("/metrics").status_code == 200
        app.state.server.engine = engine
        assert c.get("/health").json() == {"status": "ok"}
        engine.is_dead = True  # the engine loop stopped on a fatal error: report it, so it gets restarted
        try:
            r = c.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "engine_failed"}
        finally:
            engine.is_dead = False


def _health(url: str, seen: set[int]) -> int | None:
    try:
        status = httpx.get(f"{url}/health", timeout=1).status_code
    except httpx.TransportError:
        return None
    seen.add(status)
    return status


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_server_signal_drains_and_exits_zero(monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    """run_server in this (main) thread; a helper thread plays the client and sends the signal."""

    class SlowLoadingEngine(FakeEngine):
        @classmethod
        def from_config(cls, config: EngineConfig) -> FakeEngine:
            time.sleep(0.3)
            return cls(model_name=MODEL, token_delay_s=0.02)

    monkeypatch.setitem(sys.modules, "aioffload.engine.async_engine", types.SimpleNamespace(Engine=SlowLoadingEngine))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, seen, raw, checks = f"http://127.0.0.1:{port}", set(), [], {}

    def client() -> None:
        signalled = False
        try:
            checks["loaded"] = wait_for(lambda: _health(url, seen) == 200, timeout=20)
            body = {"prompt": "x", "max_tokens": 40, "stream": True}
            stream = threading.Thread(target=lambda: raw.append(httpx.post(f"{url}{C}", json=body).content))
            stream.start()
            time.sleep(0.3)
            os.kill(os.getpid(), sig)
            signalled = True
            checks["refused"] = wait_for(lambda: _health(url, set()) is None, timeout=1.0)
            stream.join(10)
        finally:
            if not signalled:
                os.kill(os.getpid(), sig)  # never leave run_server waiting

    helper = threading.Thread(target=client)
    helper.start()
    status = run_server(EngineConfig(model="fake"), ServerConfig(port=port))
    helper.join(10)
    assert status == 0
    assert checks == {"loaded": True, "refused": True}
    assert 503 in seen  # /health said "loading" before the model was in
    events = sse_events(raw[0])  # the in-flight stream was drained, not cut
    assert events[-1] == b"[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
