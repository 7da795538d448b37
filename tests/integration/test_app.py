"""The launched app, driven over HTTP by the official gradio_client, and the terminal CLI."""

from __future__ import annotations

import html
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(data_dir: Path, folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGTUNE_")}
    return env | {
        "RAGTUNE_DATA_DIR": str(data_dir),
        "RAGTUNE_QDRANT__PATH": str(folder / "qdrant"),
        "RAGTUNE_CHAT__HISTORY_DB": str(folder / "chat.sqlite3"),
        "RAGTUNE_LLM__MAX_NEW_TOKENS": "48",  # short answers: the tests are about plumbing
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def app(tmp_path_factory, session_data_dir):
    folder = tmp_path_factory.mktemp("app")
    port = _free_port()
    log = (folder / "app.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "chatbot", "--port", str(port)], cwd=REPO,
                               env=_env(session_data_dir, folder), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        assert process.poll() is None, (folder / "app.log").read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        pytest.fail("the app did not answer /healthz in time")
    yield url, folder, process
    stop(process)
    log.close()


def stop(process: subprocess.Popen) -> None:
    """Stop a launched app; open client connections can hold uvicorn's graceful shutdown."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def _text(message: dict) -> str:
    """What the page shows of a chat message (its content is inert HTML)."""
    return html.unescape(re.sub(r"<[^>]+>", "", message["content"][0]["text"])).strip()


def _final(job):
    updates = list(job)  # every streamed update
    return updates, job.result()


def test_first_start_indexes_the_demo_and_answers_with_sources(app) -> None:
    from gradio_client import Client

    url, folder, _ = app
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert "indexing" in (folder / "app.log").read_text()  # the visible first-start message
    client = Client(url, verbose=False)
    updates, (_, chat, _, sources, _) = _final(
        client.submit("What is the effect of Cardivexin on a patient with HTN and T2DM?", "rag", None, api_name="/chat"))
    sources = html.unescape(sources)  # the panel is inert HTML
    assert len(updates) > 3  # streamed, not one block
    answer = _text(chat[-1])
    assert chat[-1]["role"] == "assistant" and answer
    assert "monographs/cardivexin.md" in sources and "[1]" in sources
    page = httpx.get(url).text
    assert "<title>ragtune</title>" in page or "ragtune" in page


def test_five_concurrent_clients_get_their_own_answers_and_histories(app) -> None:
    from gradio_client import Client

    url, _, _ = app
    topics = ["Glucarnil", "Hemarovin", "Lipostrane", "Quorivelle", "Dolmerane"]

    def converse(topic: str) -> tuple[str, list[dict], str]:
        client = Client(url, verbose=False)
        # The history is the server's (memory, by the session's conversation): nothing is sent back.
        _final(client.submit(f"What is {topic} used for?", "rag", None, api_name="/chat"))
        _, (_, chat, _, sources, _) = _final(client.submit("What is its usual dose?", "rag", None, api_name="/chat"))
        return topic, chat, html.unescape(sources)

    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(converse, topics))
    for topic, chat, sources in results:
        questions = [_text(m) for m in chat if m["role"] == "user"]
        assert questions == [f"What is {topic} used for?", "What is its usual dose?"], questions
        assert all(m["content"][0]["text"] for m in chat if m["role"] == "assistant")
        assert f"{topic.lower()}.md" in sources  # the follow-up retrieved this client's topic


def test_memory_survives_a_restart_of_the_app(app, session_data_dir) -> None:
    url, folder, process = app
    stop(process)  # local-mode Qdrant admits one process: stop the server first
    env = _env(session_data_dir, folder)
    first = subprocess.run([sys.executable, "-m", "chatbot", "ask", "What is the starting dose of Glucarnil?", "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    conversation = json.loads(first.stdout)["conversation_id"]
    follow = subprocess.run([sys.executable, "-m", "chatbot", "ask", "And when eGFR is below 30?",
                             "--conversation", conversation, "--json"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert follow.returncode == 0, follow.stderr
    result = json.loads(follow.stdout)
    assert result["conversation_id"] == conversation
    assert "Glucarnil" in result["query"]  # the history came back from SQLite in a new process
    assert result["sources"][0]["source"].endswith("glucarnil.md")
    # how a user checks the speed of their own setup (--json keeps these through any backend)
    assert result["timings"]["ttft_s"] > 0 and result["timings"]["tokens_per_s"] > 0
