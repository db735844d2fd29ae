#!/usr/bin/env python3
"""Does the dashboard slow the engine? Decode step time of a real server with no poller, with a
1 Hz poller of GET /v1/dashboard (what the page asks of the server), and (--browser) with the
page itself open in headless Chromium.

    python scripts/dashboard_overhead.py --rounds 20                  # demo model, CPU, 3 of 4 layers offloaded
    python scripts/dashboard_overhead.py --browser -- --device cpu    # args after -- go to `aioffload serve`

Each round runs every condition once, in a shuffled order: `--streams` requests of `--tokens`
output tokens (ignore_eos) at once; a condition's figure is the median of its full-batch decode
steps, read from the engine's own step record. The verdict is the median over rounds of each
condition's ratio to that round's `none`, with a bootstrap 95% interval: pairs close in time
cancel slow drift from other load on the machine. Prints a table; writes --out (JSON).
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

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "aioffload" / "assets" / "demo"


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


def poll_every_second(url: str, stop: threading.Event) -> None:
    since = None
    while not stop.wait(1.0):
        since = get(f"{url}/v1/dashboard" + ("" if since is None else f"?since={since}"))["steps_total"]


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
    p.add_argument("--out", default="dashboard_overhead.json")
    p.add_argument("serve_args", nargs="*", help="after --: arguments for aioffload serve "
                   "(default: --model DEMO --cpu-offload-gb 0.007 --max-num-seqs STREAMS)")
    args = p.parse_args(argv)
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
        for rnd in range(args.rounds):
            order = conditions[:]
            rng.shuffle(order)
            for cond in order:
                stop, poller, page = threading.Event(), None, None
                if cond == "poller":
                    poller = threading.Thread(target=poll_every_second, args=(url, stop))
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
                              "decode_step_ms_per_round": medians, "vs_none": {}}
    print(f"{'condition':10s} {'median ms':>10s} {'x none (paired)':>16s} {'95% interval':>16s}")
    print(f"{'none':10s} {statistics.median(medians['none']):10.3f}")
    for c in conditions[1:]:
        ratio, lo, hi = paired([x / y for x, y in zip(medians[c], medians["none"])], rng)
        result["vs_none"][c] = {"ratio": ratio, "ci95": [lo, hi]}
        print(f"{c:10s} {statistics.median(medians[c]):10.3f} {ratio:16.4f} {f'{lo:.4f}-{hi:.4f}':>16s}")
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
