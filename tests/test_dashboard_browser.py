"""The page at `/` in a real headless Chromium against a real `aioffload serve` of the demo model,
with an API key and one layer offloaded (`--cpu-offload-gb 0.002`: the demo's layers are 3.1 MB)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from browser import chromium, open_page
from helpers import wait_for
from playwright.sync_api import Browser, Page
from server_proc import ServerProc, start_server

KEY = "browser-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OFFLOAD_GB = 0.002


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProc]:
    with start_server("--cpu-offload-gb", str(OFFLOAD_GB), "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def page_errors() -> list[str]:
    return []


@pytest.fixture(scope="module")
def page(browser: Browser, server: ServerProc, page_errors: list[str]) -> Iterator[Page]:
    """The page, given the key once; every test below shares it and checks it logged no errors."""
    p = open_page(browser, f"{server.url}/", page_errors)
    p.wait_for_selector("#key-form:not([hidden])")
    p.fill("#api-key", KEY)
    p.click("#key-form button")
    p.wait_for_function("() => Number(document.body.dataset.polls || 0) >= 1")
    yield p
    p.close()


def snapshot(server: ServerProc) -> dict:
    return httpx.get(f"{server.url}/v1/dashboard", headers=AUTH, timeout=10).json()


def set_chat(page: Page, temperature: str, max_tokens: str, ignore_eos: bool) -> None:
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.set_checked("#ignore-eos", ignore_eos)


def last_reply(page: Page) -> dict:
    return page.eval_on_selector_all(
        ".message.assistant", "els => { const e = els[els.length - 1]; "
        "return {text: e.textContent, chunks: Number(e.dataset.chunks), state: e.dataset.state}; }")


def test_page_loads_without_console_errors_and_asks_for_the_key(browser: Browser, server: ServerProc) -> None:
    errors: list[str] = []
    p = open_page(browser, f"{server.url}/", errors)
    p.wait_for_selector("#key-form:not([hidden])")
    time.sleep(1.5)  # more than one poll interval: with no key given, nothing is polled
    assert p.get_attribute("#status", "data-state") == "auth"
    assert p.get_attribute("body", "data-polls") is None
    assert p.inner_text("h1") == "aioffload"
    assert errors == []
    p.fill("#api-key", KEY)
    p.click("#key-form button")
    p.wait_for_function("() => Number(document.body.dataset.polls || 0) >= 2")
    assert p.is_hidden("#key-form") and p.get_attribute("#status", "data-state") == "ok"
    assert p.inner_text("#model") == "demo"
    assert errors == []
    p.close()


def test_a_wrong_key_is_refused_and_the_page_asks_again(browser: Browser, server: ServerProc) -> None:
    errors: list[str] = []
    p = open_page(browser, f"{server.url}/", errors)
    p.fill("#api-key", "not-the-key")
    p.click("#key-form button")
    p.wait_for_function("() => document.getElementById('status').textContent === 'the API key was refused'")
    assert p.is_visible("#key-form")
    assert any("401" in e for e in errors)  # the browser's own log line for the refused poll
    p.close()


def test_placement_map_shows_the_offloaded_layers(page: Page, server: ServerProc, page_errors: list[str]) -> None:
    layer_bytes = snapshot(server)["placement"]["layers"][0]["bytes"]
    num_layers = 4
    expected_host = num_layers - math.ceil(OFFLOAD_GB * 1e9 / layer_bytes)  # the smallest tail holding 2 MB
    page.wait_for_selector("#cells .cell[data-kind=layer]")
    cells = page.eval_on_selector_all("#cells .cell", "els => els.map(e => [e.dataset.kind, e.dataset.index || '', "
                                      "e.dataset.place])")
    assert cells == [["embed", "", "gpu"]] + [["layer", str(i), "host" if i >= expected_host else "gpu"]
                                             for i in range(num_layers)] + [["lm_head", "", "gpu"]]
    assert expected_host == 3
    totals = page.inner_text("#placement-totals")
    assert re.search(r"host weights\s+3\.1 MB \(1 layer\)", totals), totals
    assert re.search(r"resident weights\s+13\.6 MB \(3 of 4 layers\)", totals), totals  # 3 layers + 4.2 MB embed
    kv = snapshot(server)["kv_blocks_total"]
    assert re.search(rf"KV cache\s+{kv} blocks x 16 = {kv * 16:,} tokens", totals), totals
    assert "layer 3" in page.inner_text("#placement-reason")
    assert page_errors == []


def test_chat_reply_is_streamed_and_equals_the_same_request_unstreamed(page: Page, server: ServerProc,
                                                                       page_errors: list[str]) -> None:
    set_chat(page, "0", "24", ignore_eos=True)
    # Record the reply's length at every change the page makes to it.
    page.evaluate("""() => { window.lengths = []; new MutationObserver(() => {
        const e = [...document.querySelectorAll('.message.assistant')].pop();
        if (e) window.lengths.push(e.textContent.length); })
        .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true}); }""")
    page.fill("#prompt", "What is a list?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant[data-state=done]", timeout=60_000)
    reply = last_reply(page)
    lengths = [n for n in page.evaluate("window.lengths") if n > 0]
    assert reply["chunks"] >= 2 and len(set(lengths)) >= 2, (reply, lengths)  # token by token, not at once
    assert lengths == sorted(lengths) and lengths[-1] == len(reply["text"])
    body = {"messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()
    assert reply["text"] == r["choices"][0]["message"]["content"] and r["usage"]["completion_tokens"] == 24
    assert page.inner_text(".message.meta >> nth=-1").startswith("24 tokens")
    assert page_errors == []


def test_step_chart_gets_points_while_a_request_runs_and_stop_aborts_it(page: Page, server: ServerProc,
                                                                        page_errors: list[str]) -> None:
    aborted_before = _aborted(server)
    set_chat(page, "0.8", "900", ignore_eos=True)
    page.fill("#prompt", "Tell me about modules.")
    page.click("#send")
    assert wait_for(lambda: snapshot(server)["num_running"] == 1, 30)
    points = []
    for _ in range(3):  # the chart grows with each poll while the request runs
        more = f"() => Number(document.getElementById('chart-step').dataset.points) > {max(points or [0])}"
        page.wait_for_function(more, timeout=10_000)
        points.append(int(page.get_attribute("#chart-step", "data-points") or 0))
    assert points == sorted(points) and points[0] > 0 and last_reply(page)["state"] == "streaming"
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-state=stopped]")
    assert wait_for(lambda: snapshot(server)["num_running"] == 0, 10)  # the server aborted the request
    stopped_at = last_reply(page)["chunks"]
    assert 0 < stopped_at < 900
    assert wait_for(lambda: _aborted(server) == aborted_before + 1, 10)
    snap = snapshot(server)
    assert snap["kv_blocks_free"] == snap["kv_blocks_total"]  # its KV blocks came back
    time.sleep(1.2)
    assert last_reply(page)["chunks"] == stopped_at and page.is_enabled("#send")
    assert page_errors == []


def _aborted(server: ServerProc) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    m = re.search(r'^aioffload_requests_total\{finish_reason="abort"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0
