"""`aioffload serve` as a new user meets it (issue 10): configuration errors are one line and exit
status 2 before anything binds; a second Ctrl-C cuts the drain short; /health polls stay out of
the INFO log."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from server_proc import DEMO, REPO, free_port, start_server

import aioffload.serving.app as app_mod
from aioffload.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if `serve` gets as far as starting the server."""

    def refuse(*_: object) -> int:
        raise AssertionError("run_server was called: the error came after the server started")

    monkeypatch.setattr(app_mod, "run_server", refuse)


def serve_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `aioffload serve ARGV` in-process; assert exit status 2 and one line on stderr; return it."""
    assert main(["serve", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


def test_missing_model_folder(no_server: None, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = serve_error(["--model", str(tmp_path / "nope")], capsys)
    assert line == f"error: {tmp_path / 'nope'}: model folder does not exist"


def test_max_model_len_above_the_models_limit(no_server: None, capsys: pytest.CaptureFixture[str]) -> None:
    line = serve_error(["--max-model-len", "5000"], capsys)
    assert line == "error: --max-model-len 5000 exceeds the model's max_position_embeddings 1024"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_a_gpu(no_server: None, capsys: pytest.CaptureFixture[str]) -> None:
    line = serve_error(["--device", "cuda"], capsys)
    assert line == "error: --device cuda: no CUDA device is available (use --device cpu or auto)"


def test_missing_tokenizer(no_server: None, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = shutil.copytree(DEMO, tmp_path / "demo")
    (model / "tokenizer.json").unlink()
    line = serve_error(["--model", str(model)], capsys)
    assert line == f"error: {model / 'tokenizer.json'}: missing; the model folder needs a tokenizer.json"


def test_placement_that_cannot_work(no_server: None, capsys: pytest.CaptureFixture[str]) -> None:
    line = serve_error(["--cpu-offload-gb", "100"], capsys)
    assert line.startswith("error: --cpu-offload-gb 100 is more than all 4 decoder layers hold (12.6 MB)")


@pytest.mark.parametrize("port", ["-1", "70000", "http"])
def test_port_is_checked_by_the_argument_parser(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", port])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    want = f"argument --port: must be a port number in [1, 65535], got {port if port != 'http' else repr(port)}"
    assert lines == [f"aioffload serve: error: {want} (see aioffload serve --help)"]


def test_config_error_exits_before_binding(tmp_path: Path) -> None:
    """A real process: one line, status 2, and the port never listened on."""
    port = free_port()
    cmd = [sys.executable, "-m", "aioffload.cli", "serve", "--model", str(tmp_path / "nope"), "--port", str(port)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: model folder does not exist"]
    assert "Uvicorn running" not in proc.stderr + proc.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free


def test_health_access_lines_are_debug() -> None:
    f = app_mod._HealthAtDebug()
    access = logging.getLogger("uvicorn.access")

    def record(path: str) -> logging.LogRecord:
        return access.makeRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5", "GET", path, "1.1", 200), None)  # fmt: skip

    level = access.level
    try:
        access.setLevel(logging.INFO)
        assert not f.filter(record("/health")) and not f.filter(record("/health?probe=1"))
        kept = record("/v1/models")
        assert f.filter(kept) and kept.levelno == logging.INFO
        access.setLevel(logging.DEBUG)
        debug = record("/health")
        assert f.filter(debug) and (debug.levelno, debug.levelname) == (logging.DEBUG, "DEBUG")
    finally:
        access.setLevel(level)


def test_second_sigint_cuts_the_drain_short() -> None:
    """Four 900-token requests, one at a time, would drain for ~25 s; the second SIGINT ends it now."""
    with start_server("--max-num-seqs", "1", "--shutdown-timeout", "60") as server:
        started = threading.Event()
        results: list[object] = []

        def stream() -> None:
            body = {"prompt": "The Python tutorial", "max_tokens": 900, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=90) as r:
                    for _ in r.iter_bytes():
                        started.set()
                results.append(r.status_code)
            except httpx.HTTPError as e:
                results.append(e)

        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        assert started.wait(30), server.stderr_text()[-2000:]
        server.proc.send_signal(signal.SIGINT)
        time.sleep(1.5)
        assert server.proc.poll() is None, "the first SIGINT must drain, not stop"
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=30) == 0, server.stderr_text()[-3000:]
        stopped_in = time.monotonic() - t0
        for t in threads:
            t.join(30)
        log = server.stderr_text()
    assert stopped_in < 5.0, f"exited {stopped_in:.1f} s after the second SIGINT"
    assert len(results) == 4, results
    assert "second signal: aborting the in-flight requests now" in log
    # start_server polled /health until it answered 200: none of those polls is in the INFO log.
    assert "GET /health" not in log and '"POST /v1/completions HTTP/1.1" 200' in log
