"""Locust users for an OpenAI-compatible server (aioffload): completions and chat, streamed or not.

Each user is a closed loop: it sends a request, reads the answer to the end, sends the next.
Per request it reports one row of request_type "POST" (response time = end-to-end, failures
here) and, for good answers, latency rows that Locust keeps with percentiles and writes to
`--csv` files:

    TTFT  time to first token: request sent -> first SSE chunk with text (not chat's role chunk)
    ITL   inter-token latency: every gap between consecutive text chunks
    E2E   end-to-end latency: request sent -> last byte
    TOKS  output tokens/s of one request (usage.completion_tokens / E2E); its "response time"
          column holds tok/s and its content size the completion tokens

A request fails on a non-2xx status, a malformed SSE stream, a missing [DONE], or a usage count
that breaks the token rule in completion_checks.py. At the end, with --csv PREFIX, the totals
(all names merged per request type) go to PREFIX_summary.json for run.py's pass/fail table.

Workload options: command line, locust.conf, or the environment variable named in each.
Lengths are "value[:weight],...", e.g. "32:3,256:1" (prompt lengths in words; the demo model's
tokenizer makes about 1.4 tokens of an English word).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

import requests
from completion_checks import ResponseError, SSEParser, check_body
from locust import User, constant, events, task
from locust.runners import WorkerRunner
from locust.stats import StatsEntry

METRICS = ("TTFT", "ITL", "E2E", "TOKS")
WORDS = (
    "the python interpreter reads a program from a file or from standard input and runs each statement in "
    "order a function is defined with def and returns a value to its caller a module groups related "
    "functions classes and variables and other modules import it by name lists tuples and dictionaries "
    "hold collections of objects an exception stops the normal flow until a handler catches it the "
    "standard library offers tools for text processing files networking threads and data formats"
).split()
TOKENS_PER_WORD = 2  # a safe upper bound for plain English words, used to stay under max_model_len
CHAT_OVERHEAD = 16  # template tokens around one user message


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("aioffload workload")
    g.add_argument("--prompt-words", default="32:3,256:1", env_var="LOAD_PROMPT_WORDS",
                   help="prompt lengths in words, value[:weight],...")
    g.add_argument("--output-tokens", default="32:3,128:1", env_var="LOAD_OUTPUT_TOKENS",
                   help="max_tokens values, value[:weight],...")
    g.add_argument("--stream-ratio", type=float, default=0.8, env_var="LOAD_STREAM_RATIO",
                   help="fraction of requests that stream")
    g.add_argument("--chat-ratio", type=float, default=0.5, env_var="LOAD_CHAT_RATIO",
                   help="fraction of requests sent to /v1/chat/completions")
    g.add_argument("--ignore-eos", type=int, default=1, env_var="LOAD_IGNORE_EOS",
                   help="1: send ignore_eos so every answer has exactly max_tokens tokens")
    g.add_argument("--temperature", type=float, default=None, env_var="LOAD_TEMPERATURE",
                   help="sampling temperature (default: the server's)")
    g.add_argument("--api-key", default=None, env_var="LOAD_API_KEY", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--request-timeout", type=float, default=600.0, env_var="LOAD_REQUEST_TIMEOUT",
                   help="seconds a request may take")


def parse_mix(spec: str) -> tuple[list[int], list[float]]:
    """ "32:3,256" -> ([32, 256], [3.0, 1.0])"""
    values, weights = [], []
    for part in spec.split(","):
        value, _, weight = part.strip().partition(":")
        values.append(int(value))
        weights.append(float(weight or 1))
    if not values or min(values) < 1 or min(weights) <= 0:
        raise ValueError(f"bad length mix {spec!r}: want value[:weight],... with values >= 1")
    return values, weights


@dataclass(frozen=True)
class Workload:
    prompt_words: tuple[list[int], list[float]]
    output_tokens: tuple[list[int], list[float]]
    stream_ratio: float
    chat_ratio: float
    ignore_eos: bool
    temperature: float | None
    headers: dict[str, str]
    timeout: float

    @classmethod
    def from_options(cls, o: Any) -> Workload:
        headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
        return cls(parse_mix(o.prompt_words), parse_mix(o.output_tokens), o.stream_ratio, o.chat_ratio,
                   bool(o.ignore_eos), o.temperature, headers, o.request_timeout)


class CompletionUser(User):
    wait_time = constant(0)
    _server: dict[str, Any] | None = None  # /v1/models card, fetched once per process

    def on_start(self) -> None:
        self.workload = Workload.from_options(self.environment.parsed_options)
        self.session = requests.Session()
        self.session.headers.update(self.workload.headers)
        self.rng = random.Random()
        if CompletionUser._server is None:  # the model name and max_model_len; on failure the next user retries
            start, error = time.perf_counter(), None
            try:
                r = self.session.get(f"{self.host}/v1/models", timeout=30)
                r.raise_for_status()
                CompletionUser._server = r.json()["data"][0]
            except (requests.RequestException, ValueError, LookupError) as e:
                error = e
            self._fire("GET", "/v1/models", (time.perf_counter() - start) * 1e3, 0, error)

    def on_stop(self) -> None:
        self.session.close()

    def _body(self, chat: bool, stream: bool) -> tuple[dict[str, Any], int]:
        w, server, rng = self.workload, self._server or {}, self.rng
        max_tokens = rng.choices(*w.output_tokens)[0]
        words = rng.choices(*w.prompt_words)[0]
        limit = int(server.get("max_model_len") or 1 << 30)
        room = (limit - max_tokens - CHAT_OVERHEAD) // TOKENS_PER_WORD
        words = max(1, min(words, room))
        max_tokens = max(1, min(max_tokens, limit - CHAT_OVERHEAD - TOKENS_PER_WORD * words))
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        body: dict[str, Any] = {"model": server.get("id"), "max_tokens": max_tokens, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        if w.ignore_eos:
            body["ignore_eos"] = True
        if w.temperature is not None:
            body["temperature"] = w.temperature
        return body, max_tokens

    @task
    def completion(self) -> None:
        chat = self.rng.random() < self.workload.chat_ratio
        stream = self.rng.random() < self.workload.stream_ratio
        name = ("chat" if chat else "completions") + (" stream" if stream else "")
        body, max_tokens = self._body(chat, stream)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        start = time.perf_counter()
        size = 0
        try:
            with self.session.post(f"{self.host}{path}", json=body, stream=stream,
                                   timeout=(30, self.workload.timeout)) as resp:
                if not 200 <= resp.status_code < 300:
                    raise ResponseError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                if stream:
                    parser = SSEParser(chat)
                    for data in resp.iter_content(chunk_size=None):
                        size += len(data)
                        parser.feed(data, time.perf_counter() - start)
                    e2e = time.perf_counter() - start
                    result = parser.finish(max_tokens, self.workload.ignore_eos)
                    tokens = result.usage["completion_tokens"] if result.usage else 0
                else:
                    size = len(resp.content)
                    e2e = time.perf_counter() - start
                    _, tokens = check_body(resp.json(), chat, max_tokens, self.workload.ignore_eos)
        except (ResponseError, requests.RequestException, ValueError) as e:
            self._fire("POST", name, (time.perf_counter() - start) * 1e3, size, e)
            time.sleep(0.1)  # (gevent-patched) a failing server must not turn the users into a busy loop
            return
        self._fire("POST", name, e2e * 1e3, size)
        if stream and result.first_text_at is not None:
            self._fire("TTFT", name, result.first_text_at * 1e3)
            for gap in result.gaps:
                self._fire("ITL", name, gap * 1e3)
        self._fire("E2E", name, e2e * 1e3)
        self._fire("TOKS", name, tokens / e2e, tokens)

    def _fire(self, kind: str, name: str, value: float, length: int = 0, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(request_type=kind, name=name, response_time=value,
                                             response_length=length, exception=exc, context={})


def _merged(environment: Any, kind: str) -> StatsEntry:
    total = StatsEntry(environment.stats, "all", kind, use_response_times_cache=False)
    for (_, method), entry in environment.stats.entries.items():
        if method == kind:
            total.extend(entry)
    return total


def summary(environment: Any) -> dict[str, Any]:
    """Totals of the run, every name merged per request type (what run.py checks)."""
    requests_ = _merged(environment, "POST")
    toks = _merged(environment, "TOKS")
    duration = max(1e-9, time.time() - environment.stats.total.start_time)
    out: dict[str, Any] = {
        "duration_s": duration,
        "requests": requests_.num_requests,
        "failures": requests_.num_failures,
        "failure_rate": requests_.num_failures / max(1, requests_.num_requests),
        "output_tokens": toks.total_content_length,
        "output_tps": toks.total_content_length / duration,
        "metrics": {},
        "errors": [{"name": e.name, "error": e.error if isinstance(e.error, str) else repr(e.error),
                    "occurrences": e.occurrences}
                   for e in sorted(environment.stats.errors.values(), key=lambda e: -e.occurrences)[:10]],
    }
    for kind in METRICS:
        m = _merged(environment, kind)
        if m.num_requests:
            out["metrics"][kind] = {
                "count": m.num_requests, "avg": m.avg_response_time, "max": m.max_response_time,
                **{f"p{int(q * 100)}": m.get_response_time_percentile(q) for q in (0.5, 0.9, 0.99)},
            }
    return out


@events.test_stop.add_listener
def _write_summary(environment: Any, **_: Any) -> None:
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix and not isinstance(environment.runner, WorkerRunner):
        with open(f"{prefix}_summary.json", "w") as f:
            json.dump(summary(environment), f, indent=1)
