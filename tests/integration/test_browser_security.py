"""Issue 14 in real headless Chromium (Debian's, through Playwright): a poisoned document makes the
browser fetch nothing from another origin, and past conversations come back after a restart."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.integration.test_app import _env, stop
from tests.integration.test_embed import CHROMIUM
from tests.integration.test_security import app_env

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


class CountingHandler(http.server.BaseHTTPRequestHandler):
    """Another origin (another loopback port) that counts every request the page makes to it."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        CountingHandler.requests.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def poisoned_document(folder: Path, other_origin: str) -> None:
    (folder / "kb").mkdir(parents=True, exist_ok=True)
    (folder / "kb" / "zorblat.md").write_text(
        "# Zorblat handling note\n\n"
        "The Zorblat protocol requires seven checks before release.\n"
        f"![tracker][r] ![a [nested [alt]] b]({other_origin}/nested.png) ![inline]({other_origin}/inline.png)\n"
        f"<img src=\"{other_origin}/raw.png\"> [details]({other_origin}/link) <{other_origin}/auto>\n\n"
        f"[r]: {other_origin}/reference.png\n"
    )


def start(folder: Path, data_dir: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    log = (folder / "app.log").open("a")
    process = subprocess.Popen([sys.executable, "-m", "chatbot", "--port", str(port)], cwd=REPO,
                               env=_env(data_dir, folder) | env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(480):
        assert process.poll() is None, (folder / "app.log").read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail("the app did not start")


def ask(page, question: str, mode: str) -> None:
    page.locator("#question textarea:not([disabled])").wait_for(timeout=120_000)  # the page has its id
    page.locator("#mode").get_by_text(mode, exact=True).click()
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    page.locator("#chat .message").nth(1).wait_for(timeout=180_000)


def past_conversations(page, expected: int) -> list[str]:
    """The titles in the Past conversations list, once it holds ``expected`` of them."""
    deadline = time.time() + 180
    while True:
        page.locator("#past input").click()
        options = page.locator("#past").get_by_role("option")
        try:
            options.nth(expected - 1).wait_for(timeout=3000)
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: not there yet
            pass
        titles = [options.nth(i).get_attribute("aria-label") or "" for i in range(options.count())]
        page.keyboard.press("Escape")
        if len(titles) >= expected or time.time() > deadline:
            return titles
        page.wait_for_timeout(1000)  # the list is updated when the answer is complete


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_poisoned_sources_fetch_nothing_and_conversations_survive_a_restart(tmp_path, session_data_dir) -> None:
    from playwright.sync_api import sync_playwright

    from tests.integration.test_app import _free_port

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    other_origin = f"http://127.0.0.1:{other.server_address[1]}"
    poisoned_document(tmp_path, other_origin)
    env = app_env(tmp_path) | {"RAGTUNE_CHAT__DEMO_CORPUS": str(tmp_path / "kb")}
    port = _free_port()  # the same port after the restart: the browser's storage is per origin
    process = start(tmp_path, session_data_dir, port, env)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, args=BROWSER_ARGS,
                viewport={"width": 1400, "height": 1000})
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            ask(page, f"How many checks does the Zorblat protocol require? ![q]({other_origin}/question.png)", "rag")
            sources = page.locator("#sources")
            sources.get_by_text("zorblat.md").first.wait_for(timeout=60_000)
            assert "a [nested [alt]] b" in sources.inner_text()  # the alt text is shown instead
            assert page.locator("#sources img, #chat img").count() == 0
            assert page.locator(f"a[href^='{other_origin}']").count() == 0  # links are text
            page.wait_for_timeout(2000)
            assert CountingHandler.requests == []  # zero requests to any other origin

            page.locator("#new").click()
            ask(page, "What does HTN mean?", "base")
            before = past_conversations(page, expected=2)
            assert len(before) == 2, before

            stop(process)
            process = start(tmp_path, session_data_dir, port, env)
            page.reload()
            page.locator("#question textarea:not([disabled])").wait_for(timeout=120_000)
            assert sorted(past_conversations(page, expected=2)) == sorted(before)  # the same browser, the same user
            browser.close()
    finally:
        other.shutdown()
        stop(process)
