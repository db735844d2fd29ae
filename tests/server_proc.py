"""Start and stop a real `aioffload serve` subprocess on a free loopback port (tests, load tests).

    with start_server("--max-num-seqs", "1") as server:
        httpx.get(f"{server.url}/health")

`start_server` returns once /health answers 200 (the model is loaded); the process's
stdout and stderr go to a temporary file, read with `stderr_text()`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from aioffload.config import DEMO_MODEL

REPO = Path(__file__).resolve().parent.parent
DEMO = DEMO_MODEL
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class ServerProc:
    """A running server process; `stop()` (or leaving the `with` block) ends it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_file: IO[bytes]) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self._log = log_file

    def stderr_text(self) -> str:
        """Everything the process wrote so far (stderr and stdout together)."""
        return Path(self._log.name).read_text(errors="replace")  # own file offset: the child's is shared

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and wait up to `timeout` s (then SIGKILL); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProc:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self._log.close()


def _wait_healthy(server: ServerProc, deadline: float) -> bool:
    """True once /health is 200; False if the process exited first. Raises TimeoutError."""
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                return False
            try:
                if client.get(f"{server.url}/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server on port {server.port} not healthy in time:\n{server.stderr_text()[-3000:]}")


def start_server(*extra_args: str, model: str = DEMO, timeout: float = 60.0) -> ServerProc:
    """Start `python -m aioffload.cli serve --model MODEL --port P EXTRA_ARGS...` and wait for /health.

    Torch gets one intra-op thread unless OMP_NUM_THREADS is set (tiny models on a shared
    machine run faster that way). Retries with a new port if the chosen one was taken meanwhile.
    """
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + timeout
    for _ in range(3):
        port = free_port()
        cmd = [sys.executable, "-m", "aioffload.cli", "serve", "--model", model, "--host", HOST,
               "--port", str(port), *extra_args]
        log_file = tempfile.NamedTemporaryFile(prefix="aioffload-server-", suffix=".log")
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        server = ServerProc(proc, port, log_file)
        try:
            if _wait_healthy(server, deadline):
                return server
        except BaseException:
            server.__exit__(None, None, None)
            raise
        text = server.stderr_text()
        server.__exit__(None, None, None)
        if "address already in use" not in text.lower():
            raise RuntimeError(f"server exited with status {proc.returncode}:\n{text[-3000:]}")
    raise RuntimeError(f"no free port after 3 tries:\n{text[-3000:]}")
