"""The real server under abuse: disconnect storms, fuzzed bodies, KV overcommit, SIGTERM under load.

Servers: `server` (storm and fuzzing, a short --max-model-len so that every accepted request
stays cheap), one with a 64-block KV pool, one that is sent SIGTERM, and one per test that
may kill its engine.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from server_proc import DEMO, ServerProc, start_server

MODEL = DEMO
MAX_MODEL_LEN = 128

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProc]:
    with start_server("--max-model-len", str(MAX_MODEL_LEN), model=MODEL) as s:
        yield s


@pytest.fixture
def clean_log(server: ServerProc) -> Iterator[None]:
    """Fails the test if the server logged a traceback while it ran."""
    mark = len(server.stderr_text())
    yield
    log = server.stderr_text()[mark:]
    assert "Traceback" not in log, log[-4000:]


def scrape(url: str) -> dict[str, float]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    return {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples if not s.labels}


def wait_idle(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and every KV block is free; returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        idle = (m["aioffload_requests_running"] == m["aioffload_requests_waiting"] == 0
                and m["aioffload_kv_cache_usage"] == 0
                and m["aioffload_kv_blocks_free"] == m["aioffload_kv_blocks_total"])
        if idle or time.monotonic() > deadline:
            assert idle, f"not idle after {timeout} s: {m}"
            return m
        time.sleep(0.1)


def sse_payloads(raw: bytes) -> list[Any]:
    """The decoded `data:` payloads of a complete SSE body ('[DONE]' stays a string)."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    out = []
    for event in raw[:-2].split(b"\n\n"):
        assert event.startswith(b"data: "), event[:200]
        data = event[len(b"data: "):]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def check_complete(payloads: list[Any], max_tokens: int) -> None:
    """A stream that ended normally: [DONE] last, usage last before it, exactly max_tokens tokens."""
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    usage = payloads[-2]["usage"]
    assert payloads[-3]["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == max_tokens
    texts = [c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") for c in payloads[:-3]]
    assert 1 <= sum(1 for t in texts if t) <= max_tokens


def fresh_request_works(url: str) -> None:
    body = {"prompt": "The Python tutorial", "max_tokens": 8, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8 and r.json()["choices"][0]["text"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    check_complete(sse_payloads(r.content), 8)


# ---- 200 clients that leave at random points ----


async def _storm(url: str, n: int, concurrency: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    outcomes: dict[str, int] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        chat, mode = rng.random() < 0.5, rng.choice(["cancel", "cancel", "chunks", "chunks", "chunks", "complete"])
        stream = mode != "cancel" or rng.random() < 0.7
        max_tokens = rng.randint(8, 64)
        body: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
                                "stream_options": {"include_usage": True} if stream else None}
        prompt = " ".join(rng.choice(["def", "class", "list", "the", "module", "import", "x"]) for _ in range(20))
        body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        keep = rng.randint(1, 40)  # raw reads before leaving
        after = rng.uniform(0.0, 0.5)  # seconds before cancelling

        async def request() -> None:
            async with client.stream("POST", path, json=body) as r:
                assert r.status_code == 200, await r.aread()
                raw = b""
                async for data in r.aiter_raw():
                    raw += data
                    if mode == "chunks" and raw.count(b"\n\n") >= keep:
                        return  # leaving the block closes the connection mid-stream
                if stream:
                    check_complete(sse_payloads(raw), max_tokens)

        async with sem:
            try:
                await asyncio.wait_for(request(), after if mode == "cancel" else 60)
                kind = "completed" if mode != "chunks" else "left mid-stream or completed"
            except asyncio.TimeoutError:
                assert mode == "cancel", f"request {i} ({mode}) timed out"
                kind = "cancelled"
            outcomes[kind] = outcomes.get(kind, 0) + 1

    limits = httpx.Limits(max_connections=concurrency + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return outcomes


def test_disconnect_storm_returns_to_idle(server: ServerProc, clean_log: None) -> None:
    outcomes = asyncio.run(_storm(server.url, n=200, concurrency=50, seed=1))
    assert outcomes.get("cancelled", 0) > 20 and outcomes.get("completed", 0) > 10, outcomes
    m = wait_idle(server.url, timeout=5.0)
    text = httpx.get(f"{server.url}/metrics").text
    aborts = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "aioffload_requests_total" and s.labels.get("finish_reason") == "abort")
    assert aborts >= 20, text
    time.sleep(0.5)  # nothing keeps generating for a client that left
    assert scrape(server.url)["aioffload_generation_tokens_total"] == m["aioffload_generation_tokens_total"]
    fresh_request_works(server.url)


# ---- fuzzed request bodies: never a 5xx ----

SMALL_INT = st.one_of(st.integers(-3, 20), st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**30]))
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), TEXT)
JUNK = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)


# Values of the right JSON type, edge cases included (out-of-range numbers, odd unicode, long lists).
SAMPLING = {
    "model": st.sampled_from([None, "demo"]) | st.sampled_from([None, "demo", "no-such-model"]) | TEXT,
    "max_tokens": SMALL_INT,
    "temperature": st.floats(0, 2) | st.floats(-1, 3) | st.sampled_from([0, 1e308, -0.0]),
    "top_p": st.floats(0.01, 1) | st.floats(-0.5, 1.5),
    "top_k": SMALL_INT,
    "seed": SMALL_INT,
    "stop": TEXT | st.lists(TEXT, max_size=20),
    "stop_token_ids": st.lists(SMALL_INT, max_size=4),
    "ignore_eos": st.booleans(),
    "n": st.just(1) | SMALL_INT,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.sampled_from([None, False]) | SMALL_INT | st.booleans(),
    "user": TEXT,
}
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"]),
                              "text": TEXT})
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
    "content": TEXT | st.none() | st.lists(PART, max_size=3),
})
FIELDS = {  # (required, optional)
    "/v1/completions": ({"prompt": TEXT | st.lists(SMALL_INT, min_size=1, max_size=8)},
                        {**SAMPLING, "echo": st.just(False) | st.booleans()}),
    "/v1/chat/completions": ({"messages": st.lists(MESSAGE, max_size=4)},
                             {**SAMPLING, "max_completion_tokens": SMALL_INT, "top_logprobs": st.none() | SMALL_INT}),
}


@st.composite
def request_bodies(draw: st.DrawFn, path: str) -> bytes:
    """Mostly a body of well-typed fields with 0-3 mutations (a field made junk, a field
    dropped, an unknown field added, junk nested in a message); sometimes any JSON value or
    any bytes at all."""
    required, optional = FIELDS[path]
    kind = draw(st.sampled_from(["fields"] * 8 + ["json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(JUNK)).encode()
    obj = draw(st.fixed_dictionaries(required, optional=optional))
    names = sorted({**required, **optional})
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["junk", "drop", "extra", "nested"]))
        if action == "junk":
            obj[draw(st.sampled_from(names))] = draw(JUNK)
        elif action == "drop" and obj:
            del obj[draw(st.sampled_from(sorted(obj)))]
        elif action == "extra":
            obj[draw(TEXT)] = draw(JUNK)
        elif action == "nested" and isinstance(obj.get("messages"), list) and obj["messages"]:
            message = obj["messages"][draw(st.integers(0, len(obj["messages"]) - 1))]
            message[draw(st.sampled_from(["role", "content", "name", "tool_calls"]))] = draw(JUNK)
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()


def check_no_server_error(client: httpx.Client, path: str, body: bytes) -> None:
    with client.stream("POST", path, content=body, headers={"content-type": "application/json"}) as r:
        raw = r.read()
    assert r.status_code < 500, (r.status_code, raw[:500])
    if r.status_code != 200:
        assert json.loads(raw)["error"]["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        payloads = sse_payloads(raw)
        assert payloads[-1] == "[DONE]" and not any("error" in p for p in payloads[:-1]), payloads[-3:]
    else:
        assert json.loads(raw)["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def client(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


FUZZ = settings(max_examples=50, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("path", list(FIELDS))
def test_fuzzed_bodies_never_5xx(client: httpx.Client, clean_log: None, path: str) -> None:
    @FUZZ
    @given(body=request_bodies(path))
    def run(body: bytes) -> None:
        check_no_server_error(client, path, body)

    run()


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than any decoder's recursion
    b'{"prompt": "x", "max_tokens": 1e400}',
    b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "x", "max_tokens": 99999999999999999999999999999999999999}',
    b'{"prompt": "\\ud800", "max_tokens": 2}',  # a lone surrogate
    b'{"prompt": "x"' + b', "user": "' + b"u" * (1 << 20) + b'"}',  # over the 1 MiB body limit
    b'{"prompt": [' + b"7," * 200 + b'7], "max_tokens": 2}',  # longer than --max-model-len
    b'{"messages": [{"role": "user", "content": "' + "\u00e9\U0001f600".encode() * 30 + b'"}], "max_tokens": 2}',
])
def test_hostile_bodies_never_5xx(client: httpx.Client, clean_log: None, body: bytes) -> None:
    for path in FIELDS:
        check_no_server_error(client, path, body)


def test_client_leaving_during_upload_is_not_an_error(server: ServerProc) -> None:
    mark = len(server.stderr_text())
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b'{"prompt": "The')
        time.sleep(0.2)
    fresh_request_works(server.url)
    log = server.stderr_text()[mark:]
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_top_k_beyond_int64_does_not_kill_the_engine() -> None:
    with start_server("--max-model-len", str(MAX_MODEL_LEN), model=MODEL) as s:
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "The", "max_tokens": 2, "top_k": 2**63}, timeout=30)
        assert r.status_code < 500, r.text
        fresh_request_works(s.url)


# ---- more KV demand than the pool holds ----


async def _overcommit(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[Any], list[dict]]:
    samples: list[dict[str, float]] = []

    async def one(client: httpx.AsyncClient, i: int, prompt: list[int]) -> Any:
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            r = await client.post("/v1/completions", json=body)
            return sse_payloads(r.content)
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    async def watch(client: httpx.AsyncClient, done: asyncio.Event) -> None:
        while not done.is_set():
            text = (await client.get("/metrics")).text
            samples.append({s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                            if not s.labels})
            await asyncio.sleep(0.1)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(client, done))
        results = await asyncio.wait_for(asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts))), 120)
        done.set()
        await watcher
    return results, samples


def test_requests_beyond_kv_capacity_all_finish() -> None:
    blocks, block_size, max_len, n, prompt_len, max_tokens = 64, 16, 512, 12, 200, 240
    # each request needs ceil(440 / 16) = 28 blocks: two fit in the pool at once, twelve are sent
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 200) for _ in range(prompt_len)] for _ in range(n)]
    args = ("--num-kv-blocks", str(blocks), "--block-size", str(block_size), "--max-model-len", str(max_len))
    with start_server(*args, model=MODEL) as s:
        results, samples = asyncio.run(_overcommit(s.url, prompts, max_tokens))
        wait_idle(s.url)
        fresh_request_works(s.url)
        log = s.stderr_text()
    for i, res in enumerate(results):
        if i % 2:
            check_complete(res, max_tokens)
            assert res[-2]["usage"]["prompt_tokens"] == prompt_len
        else:
            assert res["choices"][0]["finish_reason"] == "length" and res["choices"][0]["text"]
            assert res["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": max_tokens,
                                    "total_tokens": prompt_len + max_tokens}
    # the pool really was the bottleneck: it filled while requests waited
    assert max(m["aioffload_kv_cache_usage"] for m in samples) > 0.8, samples
    assert max(m["aioffload_requests_waiting"] for m in samples) >= n // 2, samples
    assert "Traceback" not in log, log[-4000:]


# ---- SIGTERM with requests in flight ----


# (max_tokens, stream): short ones finish while the server drains, long ones outlast --shutdown-timeout
SIGTERM_JOBS = [(16, True)] * 4 + [(400, True)] * 4 + [(16, False), (400, False)]


async def _sigterm_under_load(s: ServerProc) -> tuple[list[tuple[int, Any]], list[Any]]:
    started = asyncio.Semaphore(0)

    async def one(client: httpx.AsyncClient, max_tokens: int, stream: bool) -> tuple[int, Any]:
        body = {"prompt": "The Python tutorial", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
                "stream_options": {"include_usage": True} if stream else None}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            raw, first = b"", True
            async for data in r.aiter_raw():
                raw += data
                if first and b'"text":"' in raw:  # a token arrived: this request is in flight
                    first = False
                    started.release()
        if not stream:
            return r.status_code, json.loads(raw)
        return r.status_code, sse_payloads(raw)

    async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
        tasks = [asyncio.create_task(one(client, m, st)) for m, st in SIGTERM_JOBS]
        for _ in [j for j in SIGTERM_JOBS if j[1]]:
            await asyncio.wait_for(started.acquire(), 60)
        s.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        late = []
        for _ in range(3):  # new requests while draining: refused, never accepted and lost
            try:
                r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
                late.append(r.status_code)
            except httpx.TransportError as e:
                late.append(type(e).__name__)
        results = await asyncio.gather(*tasks)
    return results, late


def test_sigterm_under_load_drains_and_exits_0() -> None:
    with start_server("--shutdown-timeout", "2", model=MODEL) as s:
        results, late = asyncio.run(_sigterm_under_load(s))
        status = s.stop(timeout=30)
        log = s.stderr_text()
    assert status == 0, log[-4000:]
    assert all(x == 503 or isinstance(x, str) for x in late), late
    for (max_tokens, stream), (code, res) in zip(SIGTERM_JOBS, results):
        if not stream:
            if max_tokens == 16 or code == 200:
                assert code == 200 and res["usage"]["completion_tokens"] == max_tokens, res
            else:
                assert code == 503 and res["error"]["type"] == "server_error", res
            continue
        assert code == 200
        if max_tokens == 16 or "error" not in res[-2]:
            check_complete(res, max_tokens)
        else:  # cut at the drain deadline: a clean error event, then [DONE]
            assert res[-1] == "[DONE]" and res[-2]["error"]["type"] == "server_error", res[-3:]
    assert "Traceback" not in log, log[-4000:]
