"""Runtime-only smoke check (`make smoke`, run by `make test`): the installed package, with only
its declared runtime dependencies, generates and serves the demo model.

Uses only the standard library: it runs under the smoke venv's python, which has no test extras.

    python scripts/smoke_runtime.py --bin .venv-smoke/bin

1. `import aioffload` resolves to the venv's installed copy (not this source tree);
2. `aioffload generate` on the demo model prints a continuation;
3. `aioffload serve` on a free loopback port answers /health with 200 once loaded;
4. the README's first curl (a greedy completion) gets text back;
5. SIGINT stops the server with exit status 0.
Any failure prints what went wrong (and the server's log) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
PROMPT = "The Python tutorial"


class SmokeError(RuntimeError):
    pass


def run(cmd: list[str], env: dict[str, str], cwd: str, timeout: float = 180) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        raise SmokeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SmokeError(f"the server exited with status {proc.returncode} before /health answered 200")
        try:
            if http("GET", f"{url}/health", timeout=2)[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    raise SmokeError(f"/health did not answer 200 within {timeout:.0f} s")


def smoke(bin_dir: Path, timeout: float) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    work = tempfile.mkdtemp(prefix="aioffload-smoke-")  # not the source tree: it must not shadow the install
    bin_dir = bin_dir.absolute()
    python, cli = str(bin_dir / "python"), str(bin_dir / "aioffload")
    done = []
    where = run([python, "-c", "import aioffload; print(aioffload.__file__)"], env, work).strip()
    if not Path(where).resolve().is_relative_to(bin_dir.parent.resolve()):  # e.g. a PYTHONPATH or editable install
        raise SmokeError(f"aioffload imports from {where}, not from the smoke venv {bin_dir.parent}")
    done.append(f"import: {where}")
    out = run([cli, "generate", "--prompt", PROMPT, "--max-tokens", "8"], env, work).strip()
    if not out.startswith(PROMPT) or len(out) <= len(PROMPT):
        raise SmokeError(f"generate printed {out!r}")
    done.append(f"generate: {out!r}")
    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.NamedTemporaryFile(prefix="aioffload-smoke-serve-", suffix=".log") as log:
        proc = subprocess.Popen([cli, "serve", "--host", HOST, "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=work)  # fmt: skip
        try:
            ready = wait_healthy(proc, url, timeout)
            done.append(f"serve: /health 200 after {ready:.1f} s on port {port}")
            body = {"model": "demo", "prompt": PROMPT, "max_tokens": 32, "temperature": 0}
            status, raw = http("POST", f"{url}/v1/completions", body)
            if status != 200:
                raise SmokeError(f"POST /v1/completions: {status} {raw[:500]!r}")
            reply = json.loads(raw)
            text = reply["choices"][0]["text"]
            if not text or reply["usage"]["completion_tokens"] < 1:
                raise SmokeError(f"an empty completion: {reply}")
            done.append(f"completion: {text[:60]!r}... ({reply['usage']['completion_tokens']} tokens)")
            proc.send_signal(signal.SIGINT)
            status_code = proc.wait(timeout=30)
            if status_code != 0:
                raise SmokeError(f"the server exited with status {status_code} after SIGINT")
            done.append("stop: SIGINT -> exit status 0")
        except BaseException as e:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            tail = log.read().decode(errors="replace")[-4000:]
            raise SmokeError(f"{e}\n--- server log ---\n{tail}") from None
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, required=True, help="the smoke venv's bin folder")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the server to load (default 120)")
    args = ap.parse_args()
    t0 = time.monotonic()
    try:
        done = smoke(args.bin, args.timeout)
    except (SmokeError, subprocess.TimeoutExpired, OSError) as e:
        print(f"smoke: FAILED: {e}", file=sys.stderr)
        return 1
    for line in done:
        print(f"smoke: {line}")
    print(f"smoke: OK in {time.monotonic() - t0:.1f} s (runtime dependencies only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
