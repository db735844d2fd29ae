"""The load test kit (load_tests/): the client-side token rule, and a short Locust run on the demo model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_proc import DEMO, REPO

sys.path.insert(0, str(REPO / "load_tests"))
from completion_checks import ResponseError, SSEParser, check_body  # noqa: E402

MODEL = DEMO


def chunk(text: str | None = None, finish: str | None = None, chat: bool = False, **extra: object) -> bytes:
    if chat:
        delta = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    return b"data: " + json.dumps({"id": "x", "choices": [choice], **extra}).encode() + b"\n\n"


def usage_chunk(completion: int, prompt: int = 3) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode() + b"\n\n"


def parse(parts: list[bytes], chat: bool = False, max_tokens: int = 3, ignore_eos: bool = True):
    p = SSEParser(chat)
    for i, part in enumerate(parts):
        p.feed(part, t=float(i))
    return p.finish(max_tokens, ignore_eos)


def test_stream_timings_and_token_rule() -> None:
    role = b'data: {"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    r = parse([role, chunk(" a", chat=True), chunk(" b c", chat=True), chunk(finish="length", chat=True),
               usage_chunk(3), b"data: [DONE]\n\n"], chat=True)
    # the role chunk is not the first token; a merged chunk ("b c": 2 tokens) is one gap
    assert (r.text, r.text_chunks, r.first_text_at, r.gaps) == (" a b c", 2, 1.0, [1.0])
    # events split across reads, CRLF framing
    whole = chunk(" a") + chunk(" b") + chunk(" c", finish="length") + usage_chunk(3) + b"data: [DONE]\r\n\r\n"
    r = parse([whole[:7], whole[7:50], whole[50:]])
    assert r.text == " a b c" and r.text_chunks == 3


@pytest.mark.parametrize("parts, max_tokens, ignore_eos, error", [
    ([chunk(" a", "length"), usage_chunk(1)], 1, True, "without \\[DONE\\]"),
    ([chunk(" a"), chunk(" b", "length"), usage_chunk(1), b"data: [DONE]\n\n"], 2, True, "2 text chunks"),
    ([chunk(" a", "length"), usage_chunk(1), b"data: [DONE]\n\n"], 2, True, "finish_reason length after 1"),
    ([chunk(" a", "stop"), usage_chunk(1), b"data: [DONE]\n\n"], 2, True, "with ignore_eos"),
    ([chunk(" a", "length"), b"data: [DONE]\n\n"], 1, True, "no usage chunk"),
    ([chunk(" a"), b'data: {"error": {"message": "x", "type": "server_error"}}\n\n', b"data: [DONE]\n\n"],
     1, True, "error in stream"),
    ([b"data: {not json\n\n"], 1, True, "not JSON"),
    ([b"event: x\n\n"], 1, True, "malformed SSE"),
    ([chunk(" a", "length"), usage_chunk(1), b"data: [DONE]\n\n", chunk(" b")], 1, True, "after \\[DONE\\]"),
])
def test_stream_failures(parts: list[bytes], max_tokens: int, ignore_eos: bool, error: str) -> None:
    with pytest.raises(ResponseError, match=error):
        parse(parts, max_tokens=max_tokens, ignore_eos=ignore_eos)


def test_stop_before_max_tokens_is_fine_without_ignore_eos() -> None:
    r = parse([chunk(" a"), chunk(finish="stop"), usage_chunk(2), b"data: [DONE]\n\n"], max_tokens=5,
              ignore_eos=False)  # 2 tokens (the EOS has no text) in 1 text chunk
    assert r.finish_reason == "stop" and r.usage["completion_tokens"] == 2


def test_check_body() -> None:
    usage = {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    body = {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
            "usage": usage}
    assert check_body(body, True, 4, True) == ("hi", 4)
    with pytest.raises(ResponseError, match="outside"):
        check_body(body, True, 3, False)
    with pytest.raises(ResponseError, match="without text"):
        check_body({"choices": [{"finish_reason": "length"}], "usage": usage}, False, 4, True)


@pytest.mark.timeout(180)
def test_short_load_run_has_no_failures(tmp_path: Path) -> None:
    prefix = tmp_path / "run"
    cmd = [str(REPO / "load_tests" / "run.sh"), "-u", "4", "-r", "4", "-t", "30s", "--csv", str(prefix),
           "--prompt-words", "16:3,96:1", "--output-tokens", "16:3,64:1", "--model", MODEL]
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "LOAD TEST PASSED" in proc.stdout
    with open(f"{prefix}_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    kinds = {t for t, _ in rows}
    assert {"POST", "TTFT", "ITL", "E2E", "TOKS"} <= kinds, kinds
    posts = [r for (t, _), r in rows.items() if t == "POST"]
    assert sum(int(r["Request Count"]) for r in posts) >= 10
    assert all(int(r["Failure Count"]) == 0 for r in rows.values())
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    assert summary["failures"] == 0 and summary["output_tokens"] > 0
    assert 0 < summary["metrics"]["TTFT"]["p50"] <= summary["metrics"]["E2E"]["p50"]
