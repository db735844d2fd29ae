"""The real server end to end: `aioffload serve` on the demo model in a subprocess, over HTTP.

Servers: `server` (most tests), `guarded` (--api-key, --max-queue 1 --max-num-seqs 1),
and one each for the two SIGTERM tests. The unit-level HTTP cases run against a fake
engine in test_http.py; here a representative few hit the real one.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families
from server_proc import DEMO, REPO, ServerProc, free_port, start_server

MODEL = DEMO
NAME = "demo"  # the served name: the model folder's name
MAX_MODEL_LEN = 512
LONG = 300  # tokens of a generation that is still running when the test acts on it
KEY = "sk-test-key"
PROMPT = "The Python tutorial"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProc]:
    with start_server("--max-model-len", str(MAX_MODEL_LEN), model=MODEL) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def guarded() -> Iterator[ServerProc]:
    with start_server("--api-key", KEY, "--max-queue", "1", "--max-num-seqs", "1", model=MODEL) as s:
        yield s


def sse_events(raw: bytes) -> list[bytes]:
    """Event payloads of an SSE body, checking the exact `data: ...\\n\\n` framing."""
    parts = raw.split(b"\n\n")
    assert parts[-1] == b"", "the stream must end with a blank line"
    for p in parts[:-1]:
        assert p.startswith(b"data: ") and b"\n" not in p, p
    return [p[len(b"data: "):] for p in parts[:-1]]


def scrape(client: httpx.Client) -> dict[str, float]:
    """/metrics parsed by prometheus_client: {'name{label="v"}': value}."""
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


ABORTS = 'aioffload_requests_total{finish_reason="abort"}'


def kv_all_free(m: dict[str, float]) -> bool:
    blocks_free = m["aioffload_kv_blocks_free"] == m["aioffload_kv_blocks_total"]
    return blocks_free and m["aioffload_kv_cache_usage"] == 0 and m["aioffload_requests_running"] == 0


# ---- the official OpenAI client ----


def test_models(oai: openai.OpenAI, client: httpx.Client) -> None:
    assert [m.id for m in oai.models.list()] == [NAME]
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_openai_completions_stream_equals_non_stream(oai: openai.OpenAI, sampling: dict[str, Any]) -> None:
    kw: dict[str, Any] = {"model": NAME, "prompt": PROMPT, "max_tokens": 40, **sampling}
    full = oai.completions.create(**kw)
    text = full.choices[0].text
    assert text and full.model == NAME and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage is not None and 0 < full.usage.completion_tokens <= 40
    chunks = list(oai.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_openai_chat_stream_equals_non_stream(oai: openai.OpenAI, sampling: dict[str, Any]) -> None:
    kw: dict[str, Any] = {"model": NAME, "messages": MESSAGES, "max_tokens": 40, **sampling}
    full = oai.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


# ---- the SSE wire format, read raw ----


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_sse_wire_format(client: httpx.Client, path: str) -> None:
    chat = path.endswith("chat/completions")
    body: dict[str, Any] = {"model": NAME, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                            **({"messages": MESSAGES} if chat else {"prompt": PROMPT})}
    full = client.post(path, json=body).json()
    with client.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]" and raw.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1 and chunks[0]["model"] == NAME
    assert chunks[0]["id"].startswith("chatcmpl-" if chat else "cmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk" if chat else "text_completion"}
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert full["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in choice_chunks)
    assert [c["choices"][0]["finish_reason"] for c in choice_chunks] == [None] * (len(choice_chunks) - 1) + ["length"]
    if chat:
        assert choice_chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["choices"][0]["delta"] for c in choice_chunks[1:])
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in choice_chunks)
        assert text == full["choices"][0]["message"]["content"]
    else:
        assert "".join(c["choices"][0]["text"] for c in choice_chunks) == full["choices"][0]["text"]


# ---- malformed requests get the right 4xx and an OpenAI error object ----

TOO_LONG = "hello " * (2 * MAX_MODEL_LEN)  # a token per word at least
BAD_REQUESTS = {
    "bad json": ("/v1/completions", b'{"prompt": "hi",', 400, None),
    "wrong type": ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    "negative max_tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    "temperature < 0": ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -0.5}, 400, "temperature"),
    "unknown model": ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 404, "model"),
    "prompt too long": ("/v1/completions", {"prompt": TOO_LONG, "max_tokens": 1}, 400, "prompt"),
    "chat too long": ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, 400,
                      "messages"),
    "prompt + max_tokens too long": ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400,
                                     "max_tokens"),
    "missing messages": ("/v1/chat/completions", {"model": NAME, "max_tokens": 4}, 400, "messages"),
    "empty messages": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "bad role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
                 "messages[0].role"),
    "token id out of vocab": ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    "oversized body": ("/v1/completions", {"prompt": "x" * (2 << 20)}, 413, None),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_malformed_request(client: httpx.Client, case: str) -> None:
    path, body, status, param = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"] is None
    assert error["param"] == param


# ---- disconnects, metrics, responsiveness ----


def test_disconnect_mid_stream_aborts_and_frees_kv(client: httpx.Client) -> None:
    before = scrape(client)
    assert kv_all_free(before)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        data_lines = (line for line in r.iter_lines() if line)
        assert all(next(data_lines).startswith("data: {") for _ in range(3))  # 3 chunks in
        during = scrape(client)
    # Leaving the block before the end closes the connection: the server sees a disconnect.
    assert during["aioffload_requests_running"] == 1 and not kv_all_free(during)
    assert wait_for(lambda: kv_all_free(scrape(client)), timeout=10.0), scrape(client)
    assert wait_for(lambda: scrape(client).get(ABORTS, 0) == before.get(ABORTS, 0) + 1, timeout=10.0)


def test_disconnect_while_waiting_for_a_json_body_aborts(server: ServerProc, client: httpx.Client) -> None:
    before = scrape(client)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
    assert wait_for(lambda: kv_all_free(scrape(client)), timeout=10.0), scrape(client)
    after = scrape(client)
    assert after.get(ABORTS, 0) == before.get(ABORTS, 0) + 1
    assert after["aioffload_generation_tokens_total"] - before["aioffload_generation_tokens_total"] < LONG


def test_metrics_parse_and_counters_move(client: httpx.Client) -> None:
    before = scrape(client)
    types = {f.name: f.type for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert types["aioffload_prompt_tokens"] == types["aioffload_requests"] == "counter"
    assert types["aioffload_kv_cache_usage"] == "gauge"
    assert types["aioffload_time_to_first_token_seconds"] == "histogram"
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 9, "ignore_eos": True}
    usage = client.post("/v1/completions", json=body).json()["usage"]
    after = scrape(client)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("aioffload_prompt_tokens_total") == usage["prompt_tokens"] > 0
    assert delta("aioffload_generation_tokens_total") == usage["completion_tokens"] == 9
    assert delta('aioffload_requests_total{finish_reason="length"}') == 1
    assert delta("aioffload_e2e_request_latency_seconds_count") == 1
    assert delta("aioffload_time_to_first_token_seconds_count") == 1
    assert after["aioffload_kv_cache_usage"] == 0.0


def test_health_and_metrics_fast_during_long_generation(server: ServerProc, client: httpx.Client) -> None:
    result: dict[str, httpx.Response] = {}
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}
    worker = threading.Thread(target=lambda: result.update(r=client.post("/v1/completions", json=body)))
    worker.start()
    latencies: list[tuple[str, float]] = []
    seen_running = 0
    with httpx.Client(base_url=server.url, timeout=5) as probe:
        probe.get("/health")  # open the connection before timing
        while worker.is_alive() and len(latencies) < 40:
            for path in ("/health", "/metrics"):
                t0 = time.perf_counter()
                r = probe.get(path)
                latencies.append((path, time.perf_counter() - t0))
                assert r.status_code == 200
                seen_running += path == "/metrics" and "aioffload_requests_running 1.0" in r.text
            time.sleep(0.01)
    worker.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == LONG
    assert seen_running, "no probe ran while the generation did"
    # The 2 cores are shared (a training run, other suites): allow an OS-scheduling outlier, not a trend.
    ms = sorted(round(dt * 1e3, 1) for _, dt in latencies)
    assert ms[int(0.9 * (len(ms) - 1))] < 100 and ms[-1] < 500, f"latencies (ms) during generation: {ms}"


# ---- README examples ----


def readme_examples() -> list[str]:
    """The fenced sh blocks of README.md's "## HTTP API examples" section (none if it is missing)."""
    _, _, section = (REPO / "README.md").read_text().partition("\n## HTTP API examples\n")
    section = section.split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_readme_has_examples() -> None:
    assert len(readme_examples()) >= 4


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_curl_example(server: ServerProc, index: int) -> None:
    command = readme_examples()[index].replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    assert f":{server.port}/" in command
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    if '"stream": true' in command:
        events = sse_events(out.encode())
        assert events[-1] == b"[DONE]" and len(events) > 2
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c and c["model"] == NAME for c in chunks)
    else:
        obj = json.loads(out)
        assert "error" not in obj and obj["model"] == NAME and obj["usage"]["completion_tokens"] > 0


# ---- the guarded server: --api-key, --max-queue 1 --max-num-seqs 1 ----


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["none", "wrong", "no-bearer"])
def test_api_key_required(guarded: ServerProc, headers: dict[str, str]) -> None:
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 2}
    r = httpx.post(f"{guarded.url}/v1/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{guarded.url}/v1/models", headers=headers, timeout=30).status_code == 401


def test_api_key_accepted_and_health_open(guarded: ServerProc) -> None:
    oai = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=3).usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{guarded.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{guarded.url}/metrics", timeout=5).status_code == 200


def test_full_queue_is_503_with_retry_after(guarded: ServerProc) -> None:
    n, max_tokens = 8, 64
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    barrier = threading.Barrier(n)
    results: dict[int, tuple[int, dict[str, str], bytes] | BaseException] = {}

    def send(i: int) -> None:  # even: JSON body, odd: streamed
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
            barrier.wait()
            try:
                with c.stream("POST", f"{guarded.url}/v1/completions", json={**body, "stream": i % 2 == 1}) as r:
                    results[i] = (r.status_code, dict(r.headers), r.read())
            except BaseException as e:
                results[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert sorted(results) == list(range(n)), "a request hung"
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    statuses = {i: r[0] for i, r in results.items()}  # type: ignore[index]
    assert sorted(set(statuses.values())) == [200, 503], statuses
    for i, (status, headers, raw) in results.items():  # type: ignore[misc]
        if status == 503:
            assert int(headers["retry-after"]) >= 1 and json.loads(raw)["error"]["type"] == "server_error"
        elif i % 2 == 0:
            obj = json.loads(raw)
            assert obj["choices"][0]["finish_reason"] == "length" and obj["choices"][0]["text"]
            assert obj["usage"]["completion_tokens"] == max_tokens
        else:
            events = sse_events(raw)
            assert events[-1] == b"[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks[-2]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["usage"]["completion_tokens"] == max_tokens


# ---- shutdown ----


def test_sigterm_during_stream_exits_0_and_ends_stream_cleanly() -> None:
    with start_server("--shutdown-timeout", "1", model=MODEL) as server:
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
            stream = r.iter_bytes()
            raw = next(stream)
            server.proc.send_signal(signal.SIGTERM)
            raw += b"".join(stream)
        assert server.proc.wait(timeout=30) == 0, server.stderr_text()[-3000:]
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    last = json.loads(events[-2])
    finished = "choices" in last and last["choices"][0]["finish_reason"] == "length"
    assert finished or last["error"]["type"] == "server_error", last


def test_sigterm_while_loading_exits_0() -> None:
    port = free_port()
    # A 2 GB CPU KV cache keeps the loader busy (zero-filling) for a while after /health first answers.
    cmd = [sys.executable, "-m", "aioffload.cli", "serve", "--port", str(port), "--cpu-kv-cache-gb", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: _health_status(port) is not None or proc.poll() is not None, timeout=60)
        assert _health_status(port) == 503, "the model loaded before the test could signal"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr.decode(errors="replace")[-2000:]


def _health_status(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code
    except httpx.TransportError:
        return None


# Field by field, bad values against the real server: with BAD_REQUESTS above, more than 50 cases.
BAD_FIELDS: dict[str, list[Any]] = {
    "max_tokens": ["ten", -1, 0, 1.5, [1], 10**6],
    "temperature": [-0.5, "hot", 2.5, [0]],
    "top_p": [0, 1.5, "x", -0.1],
    "top_k": [-1, "k", 2**63, 1.5],
    "n": [0, "1", -1, 10**6],  # 10**6 choices exceed --max-num-seqs
    "seed": ["s", 2**70, 1.5],
    "stop": [5, [""], [1, 2]],
    "stream": ["yes", 3],
    "echo": ["yes", 1],
    "logprobs": [21, -1, True, "1"],
    "best_of": [0, "2"],
    "logit_bias": [{"x": 1}, {"5": 101}, {"99999999": 1}, [1]],
    "presence_penalty": [2.5, "high"],
    "repetition_penalty": [0, -1],
    "min_tokens": [-1, 100],
    "prompt": [5, [], [1, -3], {"a": 1}, ""],
    "model": [5, "another-model"],
}
FIELD_CASES = [(f, v) for f, values in BAD_FIELDS.items() for v in values]


def test_n_echo_and_logprobs_once_refused_now_work(client: httpx.Client) -> None:
    """n: 2 and echo: true were in BAD_FIELDS until issue 13's sampler half."""
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 1.0, "seed": 4, "ignore_eos": True}
    two = client.post("/v1/completions", json={**body, "n": 2}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["usage"]["completion_tokens"] == 6
    echo = client.post("/v1/completions", json={**body, "echo": True, "logprobs": 0}).json()["choices"][0]
    assert echo["text"].startswith("hi") and echo["logprobs"]["token_logprobs"][0] is None
    assert len(echo["logprobs"]["tokens"]) == len(client.post("/tokenize", json={"prompt": "hi"}).json()["tokens"]) + 3


def test_bad_field_values_are_4xx_naming_the_field(client: httpx.Client) -> None:
    assert len(FIELD_CASES) + len(BAD_REQUESTS) >= 50
    wrong = []
    for field, value in FIELD_CASES:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value})
        expected = 404 if (field, value) == ("model", "another-model") else 400
        body = r.json()
        param = body.get("error", {}).get("param") or ""
        names_field = param == field or param.startswith((f"{field}[", f"{field}."))  # e.g. stop[0]
        if r.status_code != expected or not names_field or "Traceback" in r.text:
            wrong.append((field, value, r.status_code, body))
    assert not wrong, wrong
    assert client.get("/health").status_code == 200  # and the engine lived through all of it
