"""Prometheus metrics of one server, in a registry of its own (several apps may share a process).

Gauges mirror `engine.stats()` and are refreshed at scrape time; counters and latency
histograms are fed per request by a `RequestTracker`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from aioffload.engine.outputs import RequestOutput

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0)

# engine.stats() key -> gauge name (without the aioffload_ prefix), help text
_GAUGES = {
    "num_running": ("requests_running", "Requests in the running batch"),
    "num_waiting": ("requests_waiting", "Requests waiting to be scheduled"),
    "kv_usage": ("kv_cache_usage", "Fraction of KV cache blocks in use (0..1)"),
    "kv_blocks_free": ("kv_blocks_free", "Free KV cache blocks"),
    "kv_blocks_total": ("kv_blocks_total", "KV cache blocks in the pool"),
    "offload_bytes_per_step": ("offload_bytes_per_step", "Weight bytes copied host-to-device per step"),
    "expert_cache_hit_rate": ("expert_cache_hit_rate", "Share of offloaded expert loads served by the GPU cache"),
    "expert_copy_bytes_per_step": ("expert_copy_bytes_per_step", "Expert bytes copied host-to-device, last step"),
    "expert_routed_bytes_per_step": ("expert_routed_bytes_per_step", "Bytes of routed offloaded experts, last step"),
    "copy_busy_fraction": ("copy_stream_busy_fraction", "Fraction of step time the copy stream is busy"),
    "spec_mean_accepted_length": ("speculative_mean_accepted_length",
                                  "Tokens emitted per verifying sequence-step (1 = no proposal accepted)"),
}
# engine.stats() key (a running total) -> counter name (without the aioffload_ prefix and _total suffix)
_COUNTERS = {
    "spec_proposed_tokens_total": ("speculative_proposed_tokens", "Speculative tokens proposed and verified"),
    "spec_accepted_tokens_total": ("speculative_accepted_tokens", "Speculative tokens the target accepted"),
    "spec_emitted_tokens_total": ("speculative_emitted_tokens",
                                  "Tokens emitted by sequence-steps that verified proposals"),
}


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.gauges = {key: Gauge(f"aioffload_{name}", doc, registry=reg)
                       for key, (name, doc) in _GAUGES.items()}
        self.counters = {key: Counter(f"aioffload_{name}", doc, registry=reg)
                         for key, (name, doc) in _COUNTERS.items()}
        self._counted = dict.fromkeys(_COUNTERS, 0.0)  # engine totals already added to the counters
        self.prompt_tokens = Counter("aioffload_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=reg)
        self.generation_tokens = Counter("aioffload_generation_tokens", "Tokens generated", registry=reg)
        self.requests = Counter("aioffload_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=reg)
        self.ttft = Histogram("aioffload_time_to_first_token_seconds", "Arrival to first output token",
                              buckets=_TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("aioffload_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("aioffload_e2e_request_latency_seconds", "Arrival to last output token",
                             buckets=_E2E_BUCKETS, registry=reg)

    def update_engine_stats(self, stats: Mapping[str, float]) -> None:
        for key, gauge in self.gauges.items():
            if key in stats:
                gauge.set(float(stats[key]))
        for key, counter in self.counters.items():
            if key in stats and stats[key] > self._counted[key]:
                counter.inc(float(stats[key]) - self._counted[key])
                self._counted[key] = float(stats[key])

    def track(self, prompt_tokens: int, arrival: float | None = None) -> RequestTracker:
        return RequestTracker(self, prompt_tokens, time.monotonic() if arrival is None else arrival)

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)


class RequestTracker:
    """Timing of one engine request's outputs (all its choices: n, best_of); `finish` records it once."""

    def __init__(self, metrics: Metrics, prompt_tokens: int, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.output_tokens = 0  # over every choice
        self.first_token_at: float | None = None
        self._choices: dict[int, tuple[int, float]] = {}  # choice -> (its tokens so far, its last token's time)
        self.finished = False

    def on_output(self, out: RequestOutput, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if out.num_prompt_tokens:
            self.prompt_tokens = out.num_prompt_tokens
        counted, last = self._choices.get(out.index, (0, None))
        new_tokens = max(len(out.token_ids), out.num_output_tokens - counted)
        if new_tokens <= 0:
            return
        self.output_tokens += new_tokens
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.observe(now - self.arrival)
        if last is not None:
            # A delta may merge several tokens when the reader lags: spread the gap over them.
            gap = (now - last) / new_tokens
            for _ in range(new_tokens):
                self.metrics.itl.observe(gap)
        self._choices[out.index] = (counted + new_tokens, now)

    def finish(self, finish_reason: str, now: float | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        now = time.monotonic() if now is None else now
        m = self.metrics
        m.requests.labels(finish_reason=finish_reason).inc()
        m.prompt_tokens.inc(self.prompt_tokens)
        m.generation_tokens.inc(self.output_tokens)
        m.e2e.observe(now - self.arrival)
