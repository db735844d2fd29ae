"""Load test: start a server (or use --url), run Locust headless, check thresholds. See README.md.

    load_tests/run.sh [-u USERS] [-r RATE] [-t TIME] [--csv PREFIX] [--url URL]
                      [--max-failure-rate F] [--max-p99-ttft-ms MS] [--min-output-tps TPS]
                      [workload options] [server options...]

Options it does not know go to `aioffload serve` (e.g. --model DIR --max-num-seqs 32).
Prints a summary table last; exits 0 when every check passes, 1 when one fails, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKLOAD_OPTIONS = ("prompt_words", "output_tokens", "stream_ratio", "chat_ratio", "ignore_eos", "temperature",
                    "api_key", "request_timeout")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="load_tests/run.sh", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="target this running server instead of starting one (e.g. http://gpu-box:8000)")
    p.add_argument("-u", "--users", type=int, help="concurrent users (default: locust.conf)")
    p.add_argument("-r", "--spawn-rate", type=float, help="users started per second (default: locust.conf)")
    p.add_argument("-t", "--run-time", help="e.g. 30s, 5m (default: locust.conf)")
    p.add_argument("--csv", help="CSV prefix (default: load_tests/results/DATE-TIME/locust)")
    p.add_argument("--max-failure-rate", type=float, default=0.0, help="fail above this (default: 0)")
    p.add_argument("--max-p99-ttft-ms", type=float, help="fail when p99 time to first token is above (ms)")
    p.add_argument("--min-output-tps", type=float, help="fail when output tokens/s (all users) is below")
    p.add_argument("--processes", type=int, help="Locust worker processes (default: one process)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server's /health")
    w = p.add_argument_group("workload (see locustfile.py)")
    w.add_argument("--prompt-words")
    w.add_argument("--output-tokens")
    w.add_argument("--stream-ratio", type=float)
    w.add_argument("--chat-ratio", type=float)
    w.add_argument("--ignore-eos", type=int, choices=(0, 1))
    w.add_argument("--temperature", type=float)
    w.add_argument("--api-key", help="sent by the users; also given to a server that run.sh starts")
    w.add_argument("--request-timeout", type=float)
    return p


def locust_command(args: argparse.Namespace, url: str, prefix: str) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "--config", str(HERE / "locust.conf"), "-f", str(HERE / "locustfile.py"),
           "--host", url, "--csv", prefix]
    for flag, value in (("-u", args.users), ("-r", args.spawn_rate), ("-t", args.run_time),
                        ("--processes", args.processes)):
        if value is not None:
            cmd += [flag, str(value)]
    for name in WORKLOAD_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


def checks(summary: dict, args: argparse.Namespace, server_status: int | None) -> list[tuple[str, str, str, bool]]:
    """(check, value, threshold, passed) rows."""
    rows = [("requests", str(summary["requests"]), "> 0", summary["requests"] > 0),
            ("failure rate", f"{summary['failure_rate']:.4f}", f"<= {args.max_failure_rate:g}",
             summary["failure_rate"] <= args.max_failure_rate)]
    if args.max_p99_ttft_ms is not None:
        p99 = summary["metrics"].get("TTFT", {}).get("p99")
        rows.append(("p99 TTFT ms", str(p99), f"<= {args.max_p99_ttft_ms:g}",
                     p99 is not None and p99 <= args.max_p99_ttft_ms))
    if args.min_output_tps is not None:
        tps = summary["output_tps"]
        rows.append(("output tok/s", f"{tps:.1f}", f">= {args.min_output_tps:g}", tps >= args.min_output_tps))
    if server_status is not None:
        rows.append(("server exit status (SIGTERM)", str(server_status), "== 0", server_status == 0))
    return rows


def print_summary(summary: dict, rows: list[tuple[str, str, str, bool]]) -> None:
    units = {"TTFT": "ms", "ITL": "ms", "E2E": "ms", "TOKS": "tok/s per request"}
    print(f"\n{'metric':<28}{'count':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for kind, m in summary["metrics"].items():
        label = f"{kind} ({units[kind]})"
        print(f"{label:<28}{m['count']:>8}{m['p50']:>9}{m['p90']:>9}{m['p99']:>9}{m['max']:>9.0f}")
    print(f"\n{summary['requests']} requests, {summary['failures']} failed; {summary['output_tokens']} output tokens "
          f"in {summary['duration_s']:.1f} s = {summary['output_tps']:.1f} tok/s")
    for e in summary["errors"]:
        print(f"  {e['occurrences']} x {e['name']}: {e['error'][:160]}")
    print(f"\n{'check':<32}{'value':>12}  {'threshold':<12}result")
    for name, value, threshold, ok in rows:
        print(f"{name:<32}{value:>12}  {threshold:<12}{'PASS' if ok else 'FAIL'}")
    print("\nLOAD TEST " + ("PASSED" if all(r[3] for r in rows) else "FAILED"))


def default_prefix() -> str:
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / ".gitignore").write_text("*\n")
    return str(results / time.strftime("%Y%m%d-%H%M%S") / "locust")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, server_args = parser.parse_known_args(argv)
    if args.url and server_args:
        parser.error(f"--url targets a running server; these options would go to a new one: {server_args}")
    if any(a.split("=")[0] in ("--host", "--port") for a in server_args):
        parser.error("run.sh starts its server on a free loopback port: drop --host/--port (or use --url)")
    prefix = args.csv or default_prefix()
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    server = None
    if not args.url:
        sys.path.insert(0, str(REPO / "tests"))
        from server_proc import DEMO, start_server  # the repository's one way to run a test server

        if args.api_key:
            server_args += ["--api-key", args.api_key]
        model = DEMO
        for i, a in enumerate(server_args):  # start_server takes the model apart from the other flags
            if a.startswith("--model="):
                model, server_args = a.split("=", 1)[1], server_args[:i] + server_args[i + 1:]
                break
            if a == "--model" and i + 1 < len(server_args):
                model, server_args = server_args[i + 1], server_args[:i] + server_args[i + 2:]
                break
        print(f"starting aioffload serve --model {model} {' '.join(server_args)}", flush=True)
        server = start_server(*server_args, model=model, timeout=args.startup_timeout)
    url = (args.url or server.url).rstrip("/")
    summary_path = Path(f"{prefix}_summary.json")
    summary_path.unlink(missing_ok=True)
    server_status = None
    try:
        print(f"locust against {url}; CSV files: {prefix}_*.csv", flush=True)
        proc = subprocess.run(locust_command(args, url, prefix), cwd=REPO)
    finally:
        if server is not None:
            server_status = server.stop(signal.SIGTERM, timeout=60)
            Path(f"{prefix}_server.log").write_text(server.stderr_text())
            server.__exit__(None, None, None)
    if not summary_path.exists():
        print(f"locust exited with status {proc.returncode} and wrote no {summary_path}", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    rows = checks(summary, args, server_status)
    print_summary(summary, rows)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
