"""scripts/record_dashboard.py against a real server of the demo model, and
scripts/render_dashboard.py replaying that recording into the page in headless Chromium."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import CHROMIUM
from server_proc import REPO, ServerProc, start_server

KEY = "record-key"
RECORD = [sys.executable, str(REPO / "scripts" / "record_dashboard.py")]
RENDER = [sys.executable, str(REPO / "scripts" / "render_dashboard.py")]


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ServerProc]]:
    """Eight seconds of snapshots, twice a second, while 3 clients each send 2 requests of 30 tokens."""
    out = tmp_path_factory.mktemp("record") / "dashboard.jsonl"
    # Prompt lookup (on by default while offload is active) would add the speculative chart whenever
    # this repetitive prompt happens to get proposals: keep the recording's charts fixed.
    with start_server("--cpu-offload-gb", "0.007", "--api-key", KEY, "--speculative", "off") as server:
        recorder = subprocess.Popen([*RECORD, server.url, "8", str(out), "--api-key", KEY, "--interval", "0.5"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def client(i: int) -> None:
            with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
                for j in range(2):
                    body = {"prompt": "The Python tutorial" * (1 + 3 * i + j), "max_tokens": 30, "ignore_eos": True}
                    assert c.post(f"{server.url}/v1/completions", json=body).status_code == 200

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stdout, stderr = recorder.communicate(timeout=30)
        assert recorder.returncode == 0, stderr
        assert re.fullmatch(r"\d+ snapshots \(\d+ steps\) in [\d.]+ s to .*\n", stdout), stdout
        yield out, server


def test_recording_has_every_step_once_and_the_placement_first(recording: tuple[Path, ServerProc]) -> None:
    path, server = recording
    snaps = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(snaps) == 17  # at 0, 0.5, ... 8 s
    assert "placement" in snaps[0] and all("placement" not in s for s in snaps[1:])
    assert [c["place"] for c in snaps[0]["placement"]["layers"]] == ["gpu", "host", "host", "host"]
    rows = [r for s in snaps for r in s["steps"]]
    first_step = snaps[0]["steps_total"] - len(snaps[0]["steps"])
    assert len(rows) == snaps[-1]["steps_total"] - first_step  # no step lost, none twice
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    final = httpx.get(f"{server.url}/v1/dashboard", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert final["generation_tokens_total"] == 6 * 30
    assert snaps[-1]["generation_tokens_total"] == 6 * 30  # the recording outlasted the load
    assert sum(r[2] for r in rows) >= 6 * 29  # every decode token was a step's token


def test_recorder_without_the_key_says_so(recording: tuple[Path, ServerProc], tmp_path: Path) -> None:
    _, server = recording
    r = subprocess.run([*RECORD, server.url, "1", str(tmp_path / "x.jsonl")], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and "401 from the server: give --api-key KEY" in r.stderr


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_render_replays_the_recording_into_the_page(recording: tuple[Path, ServerProc], tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), "make test installs Chromium"
    path, _ = recording
    snaps = [json.loads(line) for line in path.read_text().splitlines()]
    steps = sum(len(s["steps"]) for s in snaps)
    out = tmp_path / "dashboard.png"
    r = subprocess.run([*RENDER, str(path), str(out), "--width", "1200", "--height", "900"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{len(snaps)} snapshots; step chart {steps} points, rate charts {len(snaps) - 1} points;" in r.stdout
    assert "charts step,batch,toks,kv,busy;" in r.stdout
    assert "6 placement cells (3 streamed from host, 0 split)" in r.stdout
    width, height = png_size(out)
    assert width == 1200 and height >= 900


def test_render_draws_split_layers_experts_and_the_series_features_add(recording: tuple[Path, ServerProc],
                                                                  tmp_path: Path) -> None:
    """What the split host/GPU layers and MoE work will add: the page renders it when it is there."""
    path, _ = recording
    snaps = [json.loads(line) for line in path.read_text().splitlines()]
    layers = snaps[0]["placement"]["layers"]
    layers[1].update(place="split", host_share=0.56, gpu_bytes=layers[1]["bytes"] // 2,
                     host_bytes=layers[1]["bytes"] - layers[1]["bytes"] // 2)
    layers[2]["experts"] = {"count": 8, "gpu": 2, "host": 6, "bytes_each": 1000}
    for i, s in enumerate(snaps):
        s["step_fields"] = [*s["step_fields"], "host_share"]
        s["steps"] = [[*row, 0.5] for row in s["steps"]]
        # speculative decoding's counters (engine/stats.py): 4 proposals a poll, 3 accepted
        s.update(spec_proposed_tokens_total=4 * i, spec_accepted_tokens_total=3 * i,
                 spec_emitted_tokens_total=4 * i, spec_verifications_total=i)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(s) + "\n" for s in snaps))
    r = subprocess.run([*RENDER, str(edited), str(tmp_path / "edited.png")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "charts step,batch,toks,kv,busy,host_share,spec;" in r.stdout
    assert "6 placement cells (2 streamed from host, 1 split)" in r.stdout


def test_render_refuses_a_recording_without_the_placement(recording: tuple[Path, ServerProc], tmp_path: Path) -> None:
    path, _ = recording
    later = tmp_path / "later.jsonl"
    later.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))
    r = subprocess.run([*RENDER, str(later), str(tmp_path / "x.png")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no placement map (record from the start" in r.stderr


def test_overhead_verdict_is_the_median_paired_ratio_with_a_bootstrap_interval() -> None:
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("dashboard_overhead", REPO / "scripts" / "dashboard_overhead.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.paired([1.0] * 8, random.Random(0)) == (1.0, 1.0, 1.0)
    ratio, lo, hi = mod.paired([0.97, 1.0, 1.01, 1.02, 1.03, 0.99, 1.05], random.Random(0))
    assert ratio == 1.01 and 0.97 <= lo <= ratio <= hi <= 1.05


def test_interleaved_windows_take_the_full_batch_steps_after_their_margin() -> None:
    import importlib.util
    import math

    spec = importlib.util.spec_from_file_location("dashboard_overhead", REPO / "scripts" / "dashboard_overhead.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    steps = [[10.1, 99.0, 4, 4],  # in the first window's margin: left out
             [10.5, 12.0, 4, 4], [11.0, 14.0, 4, 4], [11.5, 50.0, 4, 3],  # 3 running: not full batch
             [11.6, 80.0, 40, 4],  # a new request's prompt in the step: not a decode step
             [12.4, 13.0, 4, 4], [13.9, 15.0, 4, 4], [14.1, 11.0, 4, 4]]  # fmt: skip
    windows = [("none", 10.0, 12.0), ("poller", 12.0, 14.0), ("none", 14.0, 16.0)]
    out = mod.window_medians(steps, windows, 4, 0.25)
    assert out["poller"] == [14.0]  # 12.4 and 13.9
    assert out["none"][0] == 13.0 and math.isnan(out["none"][1])  # 14.1 is inside the second "none"'s margin
