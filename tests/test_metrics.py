"""Metrics: own registries, tracker arithmetic, and /metrics over HTTP moving with traffic."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from fake_engine import FakeEngine, serve
from prometheus_client.parser import text_string_to_metric_families

from aioffload.config import ServerConfig
from aioffload.engine.outputs import RequestOutput
from aioffload.serving.app import build_app
from aioffload.serving.metrics import Metrics


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    text = text.decode() if isinstance(text, bytes) else text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def out(n_new: int, total: int, finished: bool = False, reason: str | None = None) -> RequestOutput:
    return RequestOutput("r", "x" * n_new, list(range(n_new)), finished, reason, 10, total)


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.track(prompt_tokens=3, arrival=0.0).finish("stop", now=1.0)
    assert samples(a.render())[("aioffload_requests_total", (("finish_reason", "stop"),))] == 1
    assert ("aioffload_requests_total", (("finish_reason", "stop"),)) not in samples(b.render())


def test_tracker_observations() -> None:
    m = Metrics()
    t = m.track(prompt_tokens=10, arrival=100.0)
    t.on_output(out(1, 1), now=100.5)  # first token: TTFT 0.5
    t.on_output(out(0, 1), now=100.6)  # no new token: nothing observed
    t.on_output(out(2, 3), now=100.7)  # two tokens merged: two gaps of 0.1
    t.on_output(out(1, 4, True, "length"), now=100.8)
    t.finish("length", now=100.8)
    t.finish("abort", now=200.0)  # recorded once only
    s = samples(m.render())
    assert s[("aioffload_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("aioffload_time_to_first_token_seconds_count", ())] == 1
    assert s[("aioffload_inter_token_latency_seconds_count", ())] == 3
    assert s[("aioffload_inter_token_latency_seconds_sum", ())] == pytest.approx(0.3)
    assert s[("aioffload_e2e_request_latency_seconds_sum", ())] == pytest.approx(0.8)
    assert s[("aioffload_prompt_tokens_total", ())] == 10
    assert s[("aioffload_generation_tokens_total", ())] == 4
    assert s[("aioffload_requests_total", (("finish_reason", "length"),))] == 1
    assert ("aioffload_requests_total", (("finish_reason", "abort"),)) not in s


def test_engine_gauges() -> None:
    m = Metrics()
    m.update_engine_stats(FakeEngine().stats())
    s = samples(m.render())
    assert s[("aioffload_kv_blocks_total", ())] == 1024 and s[("aioffload_kv_cache_usage", ())] == 0
    assert s[("aioffload_offload_bytes_per_step", ())] == 1.5e6
    assert s[("aioffload_copy_stream_busy_fraction", ())] == 0.25
    assert s[("aioffload_requests_running", ())] == 0 and s[("aioffload_requests_waiting", ())] == 0


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeEngine, httpx.Client]]:
    engine = FakeEngine()
    with serve(build_app(engine, ServerConfig())) as url, httpx.Client(base_url=url, timeout=10) as c:
        yield engine, c


def test_metrics_endpoint_moves_with_traffic(server: tuple[FakeEngine, httpx.Client]) -> None:
    engine, c = server
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    before = samples(r.text)
    assert c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5}).status_code == 200
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with c.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.read()
    after = samples(c.get("/metrics").text)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert delta("aioffload_requests_total", (("finish_reason", "length"),)) == 2
    assert delta("aioffload_generation_tokens_total") == 8
    assert delta("aioffload_prompt_tokens_total") == len(engine.calls[-2][0]) + len(engine.calls[-1][0])
    assert delta("aioffload_time_to_first_token_seconds_count") == 2
    assert delta("aioffload_inter_token_latency_seconds_count") == 6
    assert delta("aioffload_e2e_request_latency_seconds_count") == 2
    assert after[("aioffload_kv_blocks_total", ())] == engine.num_blocks


def test_metrics_see_running_requests() -> None:
    engine = FakeEngine(token_delay_s=0.05)
    with serve(build_app(engine, ServerConfig())) as url, httpx.Client(base_url=url, timeout=10) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "p", "max_tokens": 50, "stream": True}) as r:
            lines = r.iter_lines()  # keep a reference: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            s = samples(c.get("/metrics").text)
            assert s[("aioffload_requests_running", ())] == 1 and s[("aioffload_kv_cache_usage", ())] > 0
        key = ("aioffload_requests_total", (("finish_reason", "abort"),))  # the client went away
        deadline = time.monotonic() + 1
        while key not in (s := samples(c.get("/metrics").text)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s[key] == 1 and s[("aioffload_kv_cache_usage", ())] == 0


def test_speculative_counters_follow_the_engine_totals() -> None:
    m = Metrics()
    stats = {"spec_proposed_tokens_total": 10, "spec_accepted_tokens_total": 6, "spec_emitted_tokens_total": 9,
             "spec_mean_accepted_length": 2.25}  # fmt: skip
    m.update_engine_stats(stats)
    m.update_engine_stats(stats)  # a second scrape with nothing new adds nothing
    m.update_engine_stats({**stats, "spec_proposed_tokens_total": 25, "spec_accepted_tokens_total": 7})
    s = samples(m.render())
    assert s[("aioffload_speculative_proposed_tokens_total", ())] == 25
    assert s[("aioffload_speculative_accepted_tokens_total", ())] == 7
    assert s[("aioffload_speculative_emitted_tokens_total", ())] == 9
    assert s[("aioffload_speculative_mean_accepted_length", ())] == 2.25
