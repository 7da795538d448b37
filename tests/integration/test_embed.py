"""Embedding in an intranet page, in real headless Chromium (Debian's, driven by Playwright),
and the trusted-header identity over real HTTP. The intranet pages are served from other
loopback origins (other ports) by the test itself."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.integration.test_app import _env, _free_port, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts"
QUESTION = "What is the effect of Cardivexin on a patient with HTN and T2DM?"


def launch(folder: Path, data_dir: Path, extra_env: dict[str, str]) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    log = (folder / "app.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "chatbot", "--port", str(port)], cwd=REPO,
                               env=_env(data_dir, folder) | extra_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(480):
        assert process.poll() is None, (folder / "app.log").read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return url, process
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail("the app did not start")


def serve_page(folder: Path, html: str) -> tuple[str, http.server.ThreadingHTTPServer]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text(html)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/index.html", server


def intranet_page(app_url: str) -> str:
    return (f'<!doctype html><html><head><title>Intranet</title></head><body><h1>NVH intranet</h1>'
            f'<iframe id="ragtune" src="{app_url}/" width="1300" height="900" style="border:1px solid #ccc">'
            f'</iframe></body></html>')


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_allowed_intranet_frames_the_chat_and_others_are_refused(tmp_path, session_data_dir) -> None:
    from playwright.sync_api import sync_playwright

    allowed_page_port = _free_port()
    app_url, process = launch(tmp_path, session_data_dir, {
        "RAGTUNE_SERVER__ALLOWED_EMBEDDERS": json.dumps(["'self'", f"http://127.0.0.1:{allowed_page_port}"]),
    })
    pages = []
    try:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "allowed"))
        (tmp_path / "allowed").mkdir()
        (tmp_path / "allowed" / "index.html").write_text(intranet_page(app_url))
        allowed = http.server.ThreadingHTTPServer(("127.0.0.1", allowed_page_port), handler)
        threading.Thread(target=allowed.serve_forever, daemon=True).start()
        pages.append(allowed)
        other_url, other = serve_page(tmp_path / "other", intranet_page(app_url))
        pages.append(other)

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{allowed_page_port}/index.html")
            chat = page.frame_locator("#ragtune")
            chat.locator("#question textarea").fill(QUESTION)
            chat.locator("#send").click()
            chat.locator("#sources").get_by_text("cardivexin.md").first.wait_for(timeout=180_000)
            answer = chat.locator("#chat .message").last.inner_text()
            assert answer.strip()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "embedded-chat.png"), full_page=True)

            refused = browser.new_page()
            messages: list[str] = []
            refused.on("console", lambda m: messages.append(m.text))
            refused.goto(other_url)
            refused.wait_for_timeout(3000)
            frame = next(f for f in refused.frames if f != refused.main_frame)
            assert frame.locator("#question").count() == 0  # the app never rendered in the frame
            assert any("frame-ancestors" in m for m in messages), messages
            browser.close()
    finally:
        for server in pages:
            server.shutdown()
        stop(process)


def test_trusted_header_identity_scopes_conversations(tmp_path, session_data_dir) -> None:
    from gradio_client import Client

    app_url, process = launch(tmp_path, session_data_dir, {"RAGTUNE_SERVER__AUTH": "trusted_header"})
    try:
        alice = Client(app_url, headers={"X-Forwarded-User": "alice"}, verbose=False)
        _, chat, past_alice, _, _ = alice.predict("What does AKI mean?", "base", None, api_name="/chat")
        bob = Client(app_url, headers={"X-Forwarded-User": "bob"}, verbose=False)
        _, _, past_bob, _, _ = bob.predict("What does HTN mean?", "base", None, api_name="/chat")
        alice_titles = [c[0] for c in past_alice["choices"]]
        bob_titles = [c[0] for c in past_bob["choices"]]
        assert alice_titles == ["What does AKI mean?"] and bob_titles == ["What does HTN mean?"]
        # The same user from another browser (another Gradio session) sees their own history.
        again = Client(app_url, headers={"X-Forwarded-User": "alice"}, verbose=False)
        _, _, past_again, _, _ = again.predict("What does DVT mean?", "base", None, api_name="/chat")
        assert {c[0] for c in past_again["choices"]} == {"What does AKI mean?", "What does DVT mean?"}

        assert httpx.get(app_url, timeout=10).status_code == 401  # the proxy sent no identity
        # 127.0.0.2 is not among server.trusted_proxies: a header from there is a spoof.
        spoofer = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10)
        spoofed = spoofer.get(app_url, headers={"X-Forwarded-User": "alice"})
        assert spoofed.status_code == 403
    finally:
        stop(process)
