"""Headless Chromium for the dashboard tests: Debian's binary driven by Playwright.

Playwright never downloads a browser here (`make test` installs Debian's `chromium`);
`AIOFFLOAD_CHROMIUM` names another binary. Console errors and uncaught exceptions of
every page are collected in `errors`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = os.environ.get("AIOFFLOAD_CHROMIUM", "/usr/bin/chromium")
# As root on a machine with no outside network: no sandbox, no GPU, no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium (Playwright gives it a fresh, temporary --user-data-dir)."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package "
                           "(or set AIOFFLOAD_CHROMIUM)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Browser, url: str, errors: list[str]) -> Page:
    """A new page at `url` whose console errors and page errors are appended to `errors`."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(url)
    return page
