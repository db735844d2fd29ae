#!/usr/bin/env python3
"""Render a recorded dashboard into a PNG: the real page, fed the recorded snapshots.

    python scripts/render_dashboard.py dashboard.jsonl docs/dashboard.png

A tiny local server serves this checkout's static page (`aioffload/serving/static`) and answers
GET /v1/dashboard with the lines of the recording (from `scripts/record_dashboard.py`) in
order; headless Chromium (Debian's, driven by Playwright) polls it quickly (`?poll_ms=`) and
the screenshot is taken once every line has been drawn (later polls get no answer). The charts' time axis is the
recording's own clock. Needs the test extra (playwright) and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STATIC_DIR = Path(__file__).resolve().parent.parent / "aioffload" / "serving" / "static"
CHROMIUM = os.environ.get("AIOFFLOAD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def read_recording(path: Path) -> list[bytes]:
    """The recording's snapshots, checked: JSON objects, the first with the placement map."""
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no snapshots")
    for i, line in enumerate(lines, 1):
        snap = json.loads(line)
        if not isinstance(snap, dict) or "steps_total" not in snap or "steps" not in snap:
            raise ValueError(f"{path}:{i}: not a /v1/dashboard snapshot")
    if "placement" not in json.loads(lines[0]):
        raise ValueError(f"{path}:1: no placement map (record from the start with record_dashboard.py)")
    return lines


class Replay:
    """The recorded snapshots in order; once they are used up, a poll is held until `close()`,
    so the page keeps showing the recording's last state."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.served = 0
        self.lock = threading.Lock()
        self.closed = threading.Event()

    def next(self) -> bytes | None:
        with self.lock:
            i, self.served = self.served, self.served + 1
        if i < len(self.lines):
            return self.lines[i]
        self.closed.wait()
        return None

    def close(self) -> None:
        self.closed.set()


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files as the server ships them (name -> bytes, content type)."""
    return {f.name: (f.read_bytes(), mimetypes.guess_type(f.name)[0] or "application/octet-stream")
            for f in STATIC_DIR.iterdir() if f.is_file()}


def make_server(replay: Replay) -> ThreadingHTTPServer:
    files = load_static()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/v1/dashboard":
                body = replay.next()
                if body is not None:
                    self.send(200, body, "application/json")
            elif path == "/" or path.startswith("/static/"):
                name = "index.html" if path == "/" else path.removeprefix("/static/")
                body, content_type = files.get(name, (b"not found", "text/plain"))
                self.send(200 if name in files else 404, body, content_type)
            else:
                self.send(404, b"not found", "text/plain")

        def send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def render(recording: Path, out: Path, width: int, height: int, poll_ms: int, label: str | None) -> dict[str, Any]:
    """Replay `recording` into the page and screenshot it; returns what the page drew."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set AIOFFLOAD_CHROMIUM)")
    replay = Replay(read_recording(recording))
    server = make_server(replay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/?poll_ms={poll_ms}")
            n = len(replay.lines)
            page.wait_for_function(f"() => Number(document.body.dataset.polls || 0) >= {n}",
                                   timeout=max(30_000, 4 * n * poll_ms))
            page.evaluate("label => { const s = document.getElementById('status');"
                          " s.textContent = label; s.dataset.state = 'ok'; }",
                          label or f"replay of {recording.name}")
            time.sleep(0.2)  # let the last frame paint
            page.screenshot(path=str(out), full_page=True)
            drawn = page.evaluate("""() => ({
                step_points: Number(document.getElementById('chart-step').dataset.points),
                rate_points: Number(document.getElementById('chart-toks').dataset.points),
                cells: document.querySelectorAll('#cells .cell').length,
                host_cells: document.querySelectorAll('#cells .cell[data-place=host]').length,
                split_cells: document.querySelectorAll('#cells .cell[data-place=split]').length,
                charts: [...document.querySelectorAll('#chart-grid .chart')].map(c => c.id.slice(6)) })""")
            browser.close()
    finally:
        replay.close()
        server.shutdown()
        server.server_close()
    if errors:
        raise RuntimeError("the page reported errors: " + "; ".join(errors))
    return {"snapshots": len(replay.lines), **drawn}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recording", type=Path, help="a .jsonl file from record_dashboard.py")
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--poll-ms", type=int, default=20, help="the page's poll interval during the replay")
    p.add_argument("--label", help="text of the page's status badge (default: 'replay of FILE')")
    args = p.parse_args(argv)
    try:
        drawn = render(args.recording, args.out, args.width, args.height, args.poll_ms, args.label)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {drawn['snapshots']} snapshots; step chart {drawn['step_points']} points, rate charts "
          f"{drawn['rate_points']} points; charts {','.join(drawn['charts'])}; {drawn['cells']} placement cells "
          f"({drawn['host_cells']} streamed from host, {drawn['split_cells']} split)")
    return 0 if drawn["step_points"] > 0 and drawn["cells"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
