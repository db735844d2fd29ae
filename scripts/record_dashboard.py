#!/usr/bin/env python3
"""Record a server's dashboard data: poll GET /v1/dashboard about once a second, as the page
does, and write each response body as one line of OUT.jsonl.

    python scripts/record_dashboard.py http://127.0.0.1:8000 150 dashboard.jsonl [--api-key KEY]

The first poll has no `since`, so the first line carries the placement map; later polls ask
for the steps after the last one seen. A failed poll (server still loading, unreachable) is
reported on stderr and skipped. Standard library only: it runs where nothing else is installed.
`scripts/render_dashboard.py` replays a recording into the real page and takes a screenshot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def poll(base_url: str, since: int | None, api_key: str | None, timeout_s: float) -> bytes:
    url = f"{base_url}/v1/dashboard" + ("" if since is None else f"?since={since}")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read()


def record(base_url: str, seconds: float, out_path: str, api_key: str | None, interval_s: float = 1.0) -> int:
    """Poll for `seconds`; returns the number of snapshots written."""
    base_url = base_url.rstrip("/")
    since: int | None = None
    written = steps = 0
    start = time.monotonic()
    with open(out_path, "w", encoding="utf-8") as out:
        k = 0
        while True:
            try:
                body = poll(base_url, since, api_key, timeout_s=max(5.0, interval_s))
                snap = json.loads(body)
                if since is None and "placement" not in snap:
                    raise ValueError("the first snapshot has no placement map")
                out.write(json.dumps(snap, separators=(",", ":")) + "\n")
                out.flush()
                since = snap["steps_total"]
                written += 1
                steps += len(snap["steps"])
            except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
                if isinstance(e, urllib.error.HTTPError) and e.code == 401:
                    print("error: 401 from the server: give --api-key KEY", file=sys.stderr)
                    return written
                print(f"poll failed: {e}", file=sys.stderr)
            k += 1
            next_at = start + k * interval_s  # a fixed cadence, however long a poll took
            if next_at - start > seconds:
                break
            time.sleep(max(0.0, next_at - time.monotonic()))
    print(f"{written} snapshots ({steps} steps) in {time.monotonic() - start:.1f} s to {out_path}")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("seconds", type=float, help="how long to record")
    p.add_argument("out", help="the .jsonl file to write")
    p.add_argument("--api-key", default=os.environ.get("AIOFFLOAD_API_KEY"),
                   help="the server's --api-key (default: $AIOFFLOAD_API_KEY)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default: %(default)s)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.interval <= 0:
        p.error("seconds and --interval must be > 0")
    return 0 if record(args.url, args.seconds, args.out, args.api_key, args.interval) else 1


if __name__ == "__main__":
    sys.exit(main())
