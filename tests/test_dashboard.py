"""The dashboard's data: the per-step record, the placement map, and the routes that serve them."""

from __future__ import annotations

import asyncio
import re
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from fake_engine import FakeEngine, serve

from aioffload.attention.kv_cache import kv_bytes_per_block
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig, ServerConfig
from aioffload.engine.async_engine import Engine
from aioffload.engine.placement_map import layer_cells
from aioffload.engine.request import Request
from aioffload.engine.scheduler import StepPlan
from aioffload.engine.stats import STEP_FIELDS, StepStats
from aioffload.model.layout import layer_layout
from aioffload.serving.app import build_app
from aioffload.serving.dashboard import STATIC_DIR, load_static, parse_since
from aioffload.serving.protocol import ApiError
from aioffload.worker.sampling import SamplingParams
from tests.tiny_models import add_word_tokenizer, make_checkpoint

KEY = "dash-key"


def plan(*chunks: tuple[str, int, int]) -> StepPlan:
    """A step of (request id, prompt length, tokens scheduled) chunks, each from position 0."""
    reqs = [Request(rid, list(range(3, 3 + n_prompt)), SamplingParams()) for rid, n_prompt, _ in chunks]
    return StepPlan({rid: n for rid, _, n in chunks}, reqs, [])


# ---- the step record ---------------------------------------------------------------------


def test_record_step_appends_one_row_per_step_and_keeps_only_the_newest() -> None:
    stats = StepStats(recent_steps=3)
    before = time.time()
    stats.record_step(plan(("a", 10, 10), ("b", 7, 4)), 0.025)
    for _ in range(3):
        stats.record_step(plan(("a", 10, 1)), 0.005)
    assert stats.step_fields == STEP_FIELDS == ("t", "step_ms", "tokens", "seqs")
    assert len(stats.recent) == 3  # the first of four steps fell out
    total, rows = stats.steps_since(0)
    assert total == 4 and len(rows) == 3
    assert all(before <= r[0] <= time.time() for r in rows)
    assert [r[1:] for r in rows] == [(5.0, 1, 1)] * 3
    assert stats.prompt_tokens_total == 10 + 4 + 3  # prompt positions, counted as before


def test_steps_since_returns_the_steps_after_a_step_number_oldest_first() -> None:
    stats = StepStats()
    for n in (8, 1, 2, 3):
        stats.record_step(plan(("a", 20, n), ("b", 20, n)), n / 1e3)
    assert [r[2] for r in stats.steps_since(0)[1]] == [16, 2, 4, 6]
    assert [r[2] for r in stats.steps_since(2)[1]] == [4, 6]
    assert stats.steps_since(4) == (4, [])
    assert stats.steps_since(9) == (4, [])  # a client ahead of a restarted server gets nothing, not an error


def test_extra_fields_widen_every_row() -> None:
    stats = StepStats(extra_fields=("host_share",))
    stats.record_step(plan(("a", 5, 1)), 0.2, (0.56,))
    assert stats.step_fields == ("t", "step_ms", "tokens", "seqs", "host_share")
    assert stats.steps_since(0)[1][0][1:] == (200.0, 1, 1, 0.56)


# ---- the engine's description and snapshot --------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("dashboard"), "llama", seed=3, layers=4))


def tiny_engine(path: Path, **offload: Any) -> Engine:
    cfg = EngineConfig(
        model=str(path), dtype="float32",
        cache=CacheConfig(num_blocks=64, block_size=4),
        scheduler=SchedulerConfig(max_model_len=128, max_num_batched_tokens=64, max_num_seqs=4),
        offload=OffloadConfig(**offload),
    ).validate()  # fmt: skip
    return Engine.from_config(cfg)


@pytest.fixture(scope="module")
def offloaded(tiny: Path) -> Engine:
    layer_bytes = layer_layout(Checkpoint.open(tiny).model_config).numel * 4  # float32
    return tiny_engine(tiny, cpu_offload_gb=2 * layer_bytes / 1e9)  # the last two layers


def test_describe_places_every_weight_and_adds_up_to_the_plan(offloaded: Engine) -> None:
    d = offloaded.describe()
    p, w = offloaded.worker.placement, offloaded.worker
    assert [c["place"] for c in d["layers"]] == ["gpu", "gpu", "host", "host"]
    assert [c["index"] for c in d["layers"]] == [0, 1, 2, 3]
    assert all(c["gpu_bytes"] + c["host_bytes"] == c["bytes"] == p.layer_bytes for c in d["layers"])
    vocab_bytes = 256 * 64 * 4  # [V, H] float32
    assert d["embed"] == {"place": "gpu", "bytes": vocab_bytes}
    assert d["lm_head"] == {"place": "gpu", "bytes": vocab_bytes, "tied": False}
    assert d["final_norm"] == {"place": "gpu", "bytes": 64 * 4}
    gpu = d["embed"]["bytes"] + d["lm_head"]["bytes"] + d["final_norm"]["bytes"]
    gpu += sum(c["gpu_bytes"] for c in d["layers"])
    assert gpu == d["totals"]["gpu_weight_bytes"] == p.gpu_weight_bytes
    assert sum(c["host_bytes"] for c in d["layers"]) == d["totals"]["host_weight_bytes"] == 2 * p.layer_bytes
    kv_memory = (64 + 1) * kv_bytes_per_block(4, 4, 2, 16, 4)  # the tensors hold one trash block more
    assert d["kv"] == {"blocks": 64, "block_size": 4, "tokens": 256, "bytes": kv_memory}
    assert d["copy"]["bytes_per_step"] == 2 * p.layer_bytes
    assert d["copy"]["floor_ms"] == pytest.approx(2 * p.layer_bytes / w.h2d_bytes_per_s * 1e3)
    assert (d["device"], d["dtype"], d["num_layers"], d["offload_active"]) == ("cpu", "float32", 4, True)
    assert d["reason"] == p.reason and d["cuda_graphs"] is False
    assert msgspec.json.decode(msgspec.json.encode(d)) == d  # plain JSON data


def test_dashboard_snapshot_has_one_row_per_step_of_a_generation(tiny: Path) -> None:
    engine = tiny_engine(tiny)  # all resident: one token per decode step (nothing to speculate for)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    steps0 = engine.stats_.steps_total

    async def main() -> int:
        n = 0
        try:
            async for out in engine.generate([1, 5, 6, 7, 8], params, "dash-1"):
                n += len(out.token_ids)
        finally:
            await engine.shutdown(1.0)
        return n

    assert asyncio.run(main()) == 12
    snap = engine.dashboard(steps0)
    rows = snap["steps"]
    assert snap["steps_total"] == steps0 + 12  # one prefill step, then 11 decode steps
    assert [r[2] for r in rows] == [5] + [1] * 11  # tokens per step
    assert [r[3] for r in rows] == [1] * 12  # sequences per step
    assert all(r[1] > 0 for r in rows) and [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert snap["step_fields"] == ("t", "step_ms", "tokens", "seqs")
    assert snap["generation_tokens_total"] == 12 and snap["num_running"] == 0
    assert snap["copy_floor_ms"] == 0.0 and snap["model"] == "llama-3"
    assert len(engine.dashboard(steps0 + 10)["steps"]) == 2


def test_layer_cells_of_a_split_mark_the_offloaded_layers_split(offloaded: Engine) -> None:
    cells = layer_cells(offloaded.worker.placement, 4, split=True)
    assert [c["place"] for c in cells] == ["gpu", "gpu", "split", "split"]
    assert all("host_share" not in c for c in cells)  # chosen per step: the step record carries it
    assert [c["host_bytes"] for c in cells] == [0, 0, cells[0]["bytes"], cells[0]["bytes"]]


def test_a_worker_that_splits_puts_its_host_share_in_every_step_row(offloaded: Engine) -> None:
    worker = offloaded.worker
    had, before = "hybrid" in vars(worker), vars(worker).get("hybrid")
    worker.hybrid = types.SimpleNamespace(last_share=0.25)  # stands for worker/hybrid.py's HybridPlan
    try:
        engine = Engine(offloaded.config, worker, offloaded.tokenizer, "split")
        assert engine.stats_.step_fields == ("t", "step_ms", "tokens", "seqs", "host_share")
        assert [c["place"] for c in engine.describe()["layers"]] == ["gpu", "gpu", "split", "split"]
        engine._record_step(plan(("a", 5, 1)), 0.1)
        worker.hybrid.last_share = 0.5
        engine._record_step(plan(("a", 5, 1)), 0.1)
        assert [r[4] for r in engine.dashboard()["steps"]] == [0.25, 0.5]
    finally:
        if had:
            worker.hybrid = before
        else:
            del worker.hybrid
    assert offloaded.stats_.step_fields == STEP_FIELDS  # a worker without a split: no extra column


# ---- the routes --------------------------------------------------------------------------------


class DashboardFakeEngine(FakeEngine):
    """A FakeEngine with the dashboard's two methods; remembers the `since` it was asked for."""

    def __init__(self) -> None:
        super().__init__(model_name="fake-model")
        self.asked: list[int] = []

    def describe(self) -> dict[str, Any]:
        return {"layers": [{"index": 0, "place": "host", "bytes": 10, "gpu_bytes": 0, "host_bytes": 10}]}

    def dashboard(self, since: int = 0) -> dict[str, Any]:
        self.asked.append(since)
        return {"steps_total": 7, "step_fields": ["t", "step_ms", "tokens", "seqs"], "steps": [[1.0, 2.0, 3, 1]]}


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[str, DashboardFakeEngine]]:
    engine = DashboardFakeEngine()
    with serve(build_app(engine, ServerConfig(api_key=KEY))) as url:
        yield url, engine


def test_page_and_static_files_need_no_key_and_say_that_the_server_wants_one(keyed: tuple[str, Any]) -> None:
    url, _ = keyed
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<meta name="aioffload-api-key" content="required">' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    r = httpx.get(f"{url}/static/app.js")
    assert r.status_code == 200 and r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.content == (STATIC_DIR / "app.js").read_bytes()
    for bad in ("nope.js", "..%2Fdashboard.py", "%2E%2E%2F%2E%2E%2Fapp.py"):
        assert httpx.get(f"{url}/static/{bad}").status_code == 404


def test_without_a_key_the_page_says_none_is_needed() -> None:
    with serve(build_app(DashboardFakeEngine(), ServerConfig())) as url:
        assert '<meta name="aioffload-api-key" content="optional">' in httpx.get(f"{url}/").text
        assert httpx.get(f"{url}/v1/dashboard").status_code == 200


def test_every_file_the_page_loads_is_served(keyed: tuple[str, Any]) -> None:
    url, _ = keyed
    html = httpx.get(f"{url}/").text
    wanted = set(re.findall(r'(?:src|href)="/static/([^"]+)"', html))
    for js in (STATIC_DIR).glob("*.js"):
        wanted |= set(re.findall(r'from "\./([^"]+)"', js.read_text()))
    assert {"app.js", "api.js", "chat.js", "charts.js", "placement.js", "uPlot.iife.min.js"} <= wanted
    for name in sorted(wanted):
        r = httpx.get(f"{url}/static/{name}")
        assert r.status_code == 200 and len(r.content) > 100, name
    assert "uPlot-LICENSE.txt" in load_static()  # the vendored library ships with its licence
    assert "MIT License" in httpx.get(f"{url}/static/uPlot-LICENSE.txt").text


def test_dashboard_data_needs_the_key_and_carries_the_placement_on_the_first_poll(keyed: tuple[str, Any]) -> None:
    url, engine = keyed
    r = httpx.get(f"{url}/v1/dashboard")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    auth = {"Authorization": f"Bearer {KEY}"}
    first = httpx.get(f"{url}/v1/dashboard", headers=auth).json()
    assert first["placement"]["layers"][0]["place"] == "host" and first["steps"] == [[1.0, 2.0, 3, 1]]
    later = httpx.get(f"{url}/v1/dashboard?since=6", headers=auth).json()
    assert "placement" not in later and later["steps_total"] == 7
    assert engine.asked[-2:] == [0, 6]
    r = httpx.get(f"{url}/v1/dashboard?since=-1", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"


def test_dashboard_data_while_the_model_loads_is_503_with_retry_after() -> None:
    with serve(build_app(None, ServerConfig())) as url:
        r = httpx.get(f"{url}/v1/dashboard")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert httpx.get(f"{url}/").status_code == 200  # the page itself is there at once


def test_parse_since() -> None:
    assert parse_since(None) is None and parse_since("0") == 0 and parse_since("42") == 42
    for bad in ("", "-3", "1.5", "x"):
        with pytest.raises(ApiError, match="since must be a step number"):
            parse_since(bad)
