#!/usr/bin/env python3
"""Does the dashboard slow the engine? Decode step time of a real server with no poller, with a
1 Hz poller of GET /v1/dashboard (what the page asks of the server), and (--browser) with the
page itself open in headless Chromium.

    python scripts/dashboard_overhead.py --rounds 20                  # demo model, CPU, 3 of 4 layers offloaded
    python scripts/dashboard_overhead.py --interleave 40              # 40 pairs of 3 s windows, one workload
    python scripts/dashboard_overhead.py --browser -- --device cpu    # args after -- go to `aioffload serve`

Rounds (the default): each round runs every condition once, in a shuffled order: `--streams`
requests of `--tokens` output tokens (ignore_eos) at once; a condition's figure is the median of
its full-batch decode steps, read from the engine's own step record.

Interleaved (--interleave N): one continuous workload (`--streams` clients, each sending request
after request) while the poller is switched on and off in windows of `--window` seconds, N pairs
in shuffled order; a window's figure is the median of the full-batch steps that ended inside it
(its first 0.25 s left out). Short adjacent windows cancel the drift that makes whole rounds of
a CPU run differ by 20%; each "on" window holds the page's polls, at 0.5 s, 1.5 s, ... into it.

Either way the verdict is the median over pairs (rounds) of each condition's ratio to its
`none`, with a bootstrap 95% interval. Prints a table; writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from aioffload.config import DEMO_MODEL

REPO = Path(__file__).resolve().parent.parent
DEMO = Path(DEMO_MODEL)


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()


def workload(url: str, streams: int, tokens: int) -> None:
    def one(i: int) -> None:
        post(f"{url}/v1/completions", {"prompt": f"The Python tutorial {i}", "max_tokens": tokens,
                                       "ignore_eos": True, "temperature": 0})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def poll_every_second(url: str, stop: threading.Event, since: int) -> None:
    """The open page's polls: once a second, the steps after its last answer (a first poll
    without `since` returns the whole step record: the page makes it once, when it opens)."""
    while not stop.wait(1.0):
        since = get(f"{url}/v1/dashboard?since={since}")["steps_total"]


def poll_in_window(url: str, t0: float, window: float, stop: threading.Event, since: list[int]) -> None:
    """The page's 1 Hz polls inside one window: at t0 + 0.5 s, 1.5 s, ... (t0 from time.time()),
    each asking for the steps after its last answer, as the open page does (`since` carries it)."""
    k = 0
    while t0 + 0.5 + k < t0 + window - 0.05:
        if stop.wait(max(0.0, t0 + 0.5 + k - time.time())):
            return
        since[0] = get(f"{url}/v1/dashboard?since={since[0]}")["steps_total"]
        k += 1


def interleaved(url: str, streams: int, tokens: int, pairs: int, window: float, rng: random.Random,
                margin: float = 0.25) -> dict[str, list[float]]:  # fmt: skip
    """Per-window medians of full-batch step ms, for "none" and "poller" windows in shuffled pairs."""
    done = threading.Event()

    def client(i: int) -> None:
        while not done.is_set():
            post(f"{url}/v1/completions", {"prompt": f"The Python tutorial {i}", "max_tokens": tokens,
                                           "ignore_eos": True, "temperature": 0})  # fmt: skip

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    for t in clients:
        t.start()
    time.sleep(3.0)  # every client in flight
    since = get(f"{url}/v1/dashboard?since=0")["steps_total"]
    steps: list[list[float]] = []
    windows: list[tuple[str, float, float]] = []
    try:
        for _ in range(pairs):
            order = ["none", "poller"]
            rng.shuffle(order)
            for cond in order:
                t0, stop = time.time(), threading.Event()
                poller = threading.Thread(target=poll_in_window, args=(url, t0, window, stop, [since]))
                if cond == "poller":
                    poller.start()
                time.sleep(max(0.0, t0 + window - time.time()))
                stop.set()
                if cond == "poller":
                    poller.join()
                windows.append((cond, t0, time.time()))
                snap = get(f"{url}/v1/dashboard?since={since}")  # in the next window's left-out margin
                since = snap["steps_total"]
                steps.extend(snap["steps"])
    finally:
        done.set()
        for t in clients:
            t.join()
    return window_medians(steps, windows, streams, margin)


def window_medians(steps: list[list[float]], windows: list[tuple[str, float, float]], streams: int,
                   margin: float) -> dict[str, list[float]]:  # fmt: skip
    """Per condition, in window order: the median ms of the full-batch decode steps (`streams`
    running, one token each: no prompt of a new request in it) that ended in [t0 + margin, t1];
    nan for a window with none. Steps: (time, ms, tokens, running)."""
    out: dict[str, list[float]] = {}
    for cond, t0, t1 in windows:
        inside = [r[1] for r in steps if t0 + margin <= r[0] <= t1 and r[2] == r[3] == streams]
        out.setdefault(cond, []).append(statistics.median(inside) if inside else float("nan"))
    return out


def paired(ratios: list[float], rng: random.Random, draws: int = 2000) -> tuple[float, float, float]:
    """(median, 2.5th and 97.5th percentile of the bootstrapped median) of per-round ratios."""
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return statistics.median(ratios), boot[int(0.025 * draws)], boot[int(0.975 * draws) - 1]


def start_server(serve_args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile(prefix="aioffload-overhead-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "aioffload.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; its log: {log.name}")
        try:
            get(f"{url}/health")
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server was not healthy in time; its log: {log.name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--streams", type=int, default=16, help="concurrent requests per run (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=100, help="output tokens per request (default: %(default)s)")
    p.add_argument("--browser", action="store_true", help="also the page open in headless Chromium (playwright)")
    p.add_argument("--interleave", type=int, default=0, metavar="PAIRS",
                   help="interleaved design: this many pairs of windows over one workload (no --browser)")
    p.add_argument("--window", type=float, default=3.0, help="seconds per interleaved window (default: %(default)s)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "dashboard_overhead.json"),
                   help="where the JSON goes (default: %(default)s)")
    p.add_argument("serve_args", nargs="*", help="after --: arguments for aioffload serve "
                   "(default: --model DEMO --cpu-offload-gb 0.007 --max-num-seqs STREAMS)")
    args = p.parse_args(argv)
    if args.interleave and args.browser:
        p.error("--interleave measures the poller only; run --browser with the rounds design")
    serve_args = args.serve_args or ["--model", str(DEMO), "--cpu-offload-gb", "0.007"]
    serve_args = [*serve_args, "--max-num-seqs", str(args.streams)]
    conditions = ["none", "poller"] + (["page"] if args.browser else [])
    medians: dict[str, list[float]] = {c: [] for c in conditions}
    rng = random.Random(0)
    proc, url = start_server(serve_args)
    pw = browser = None
    try:
        if args.browser:
            from playwright.sync_api import sync_playwright

            pw = sync_playwright().start()
            browser = pw.chromium.launch(executable_path=os.environ.get("AIOFFLOAD_CHROMIUM", "/usr/bin/chromium"),
                                         headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-quic",
                                                              "--no-first-run", "--disable-background-networking",
                                                              "--disable-component-update", "--disable-sync"])
        workload(url, args.streams, args.tokens)  # warm-up
        since = get(f"{url}/v1/dashboard?since=0")["steps_total"]
        if args.interleave:
            medians = interleaved(url, args.streams, args.tokens, args.interleave, args.window, rng)
        for rnd in range(0 if args.interleave else args.rounds):
            order = conditions[:]
            rng.shuffle(order)
            for cond in order:
                stop, poller, page = threading.Event(), None, None
                if cond == "poller":
                    poller = threading.Thread(target=poll_every_second, args=(url, stop, since))
                    poller.start()
                if cond == "page" and browser is not None:
                    page = browser.new_page()
                    page.goto(f"{url}/")
                    page.wait_for_function("() => Number(document.body.dataset.polls || 0) >= 1")
                time.sleep(1.0)
                workload(url, args.streams, args.tokens)
                stop.set()
                if poller is not None:
                    poller.join()
                if page is not None:
                    page.close()
                snap = get(f"{url}/v1/dashboard?since={since}")
                since = snap["steps_total"]
                full = [r[1] for r in snap["steps"] if r[2] == r[3] == args.streams]
                medians[cond].append(statistics.median(full))
            print(f"round {rnd}: " + ", ".join(f"{c} {medians[c][-1]:.2f} ms" for c in conditions), flush=True)
    finally:
        if browser is not None and pw is not None:
            browser.close()
            pw.stop()
        proc.terminate()
        proc.wait(60)
    result: dict[str, Any] = {"serve_args": serve_args, "streams": args.streams, "tokens": args.tokens,
                              "design": f"interleaved {args.interleave} x {args.window} s" if args.interleave else
                              f"rounds {args.rounds}", "decode_step_ms_per_round": medians, "vs_none": {}}  # fmt: skip
    print(f"{'condition':10s} {'median ms':>10s} {'x none (paired)':>16s} {'95% interval':>16s}")
    print(f"{'none':10s} {statistics.median(medians['none']):10.3f}")
    for c in conditions[1:]:
        pairs = [x / y for x, y in zip(medians[c], medians["none"]) if x == x and y == y]  # nan: an empty window
        ratio, lo, hi = paired(pairs, rng)
        result["vs_none"][c] = {"ratio": ratio, "ci95": [lo, hi]}
        print(f"{c:10s} {statistics.median(medians[c]):10.3f} {ratio:16.4f} {f'{lo:.4f}-{hi:.4f}':>16s}")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
