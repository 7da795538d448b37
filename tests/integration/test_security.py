"""Issue 14 against the launched app, over real HTTP: no client value names a server file,
uploads are kept by owner and content, a flooder cannot take the queue, a kill -9 during an
upload's ingest leaves no partial document."""

from __future__ import annotations

import html
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import DEMO, REPO
from tests.integration.test_app import stop
from tests.integration.test_embed import launch

FILE_URL = re.compile(r"/gradio_api/file=[^\"'\s\\]+")


def small_knowledge_base(folder: Path) -> Path:
    """Two demo documents: indexed in seconds, enough for retrieval to have something to find."""
    kb = folder / "kb"
    for name in ("glossary/clinical-abbreviations.md", "monographs/cardivexin.md"):
        (kb / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO / name, kb / name)
    return kb


def app_env(folder: Path) -> dict[str, str]:
    return {
        "RAGTUNE_CHAT__DEMO_CORPUS": str(small_knowledge_base(folder)),
        "RAGTUNE_CHAT__ANONYMOUS_UPLOADS": "true",
        "RAGTUNE_CHAT__UPLOADS_DIR": str(folder / "uploads"),
        "RAGTUNE_LLM__MAX_NEW_TOKENS": "16",
    }


@pytest.fixture(scope="module")
def secure_app(tmp_path_factory, session_data_dir):
    folder = tmp_path_factory.mktemp("secure")
    url, process = launch(folder, session_data_dir, app_env(folder))
    yield url, folder
    stop(process)


def _stream(url: str, response: httpx.Response, session_hash: str | None = None) -> str:
    """Everything the server streams back for one call (SSE), or the refusal itself."""
    if response.status_code != 200:
        return response.text
    if session_hash is None:  # /call/<api>: the result stream is per event
        event_id = response.json()["event_id"]
        api = response.request.url.path.rsplit("/", 1)[-1]
        return httpx.get(f"{url}/gradio_api/call/{api}/{event_id}", timeout=120).text
    lines = []
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session_hash},
                      timeout=120) as stream:
        for line in stream.iter_lines():
            lines.append(line)
            if "process_completed" in line or "close_stream" in line:
                break
    return "\n".join(lines)


def _fn_index(url: str, api_name: str) -> tuple[int, int]:
    config = httpx.get(f"{url}/config", timeout=10).json()
    dependency = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
    return dependency["id"], len(dependency["inputs"])


def test_no_client_value_names_a_server_file(secure_app) -> None:
    url, folder = secure_app
    secrets_on_disk = {  # file -> text that would show it leaked
        "/etc/passwd": "root:x:0:",
        str(REPO / "settings.yaml"): "chunk_tokens: 200",
        str(folder / "chat.sqlite3"): "SQLite format 3",
    }
    chat_fn, chat_inputs = _fn_index(url, "chat")
    upload_fn, upload_inputs = _fn_index(url, "upload")
    answers = []
    for path, marker in secrets_on_disk.items():
        assert marker in Path(path).read_bytes().decode("latin-1")  # the file is there to steal
        file = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "notes.md"}
        history = [{"role": "user", "content": [{"type": "file", "file": file}]}]
        # The reproduction, then the file reference in every input of the chat and upload events.
        calls = [httpx.post(f"{url}/gradio_api/call/chat", json={"data": ["", "rag", history, None]}, timeout=30)]
        calls += [httpx.post(f"{url}/gradio_api/call/chat", json={"data": [file if i == n else v for i, v in
                                                                            enumerate(["Hi", "base", None])]},
                             timeout=30) for n in range(3)]
        calls += [httpx.post(f"{url}/gradio_api/call/upload", json={"data": [[file], None]}, timeout=30)]
        for response in calls:
            answers.append(_stream(url, response))
        for fn, count, data in ((chat_fn, chat_inputs, [file] * chat_inputs),
                                (upload_fn, upload_inputs, [[file]] + [file] * (upload_inputs - 1))):
            session = secrets.token_hex(8)
            joined = httpx.post(f"{url}/gradio_api/queue/join", timeout=30, json={
                "data": data, "fn_index": fn, "session_hash": session, "event_data": None, "trigger_id": None})
            answers.append(_stream(url, joined, session))
        direct = httpx.get(f"{url}/gradio_api/file={path}", timeout=10)
        assert direct.status_code == 403 or marker not in direct.text
    served = []
    for text in answers:
        for file_url in FILE_URL.findall(text):
            served.append(httpx.get(url + file_url, timeout=10).text)
    everything = "\n".join(answers + served)
    for path, marker in secrets_on_disk.items():
        assert marker not in everything, f"{path} leaked"
    assert not list((folder / "uploads").rglob("*.md")), "a server file was stored as an upload"

    # A file placed in Gradio's upload folder that no upload brought: Gradio's own check lets it
    # through (it is in the folder), the upload service does not.
    from gradio.utils import get_upload_folder

    planted = Path(get_upload_folder()) / secrets.token_hex(16) / "planted.md"
    planted.parent.mkdir(parents=True)
    planted.write_text("# Planted\n\nQuux planted text.\n")
    try:
        response = httpx.post(f"{url}/gradio_api/call/upload", json={"data": [[{
            "path": str(planted), "meta": {"_type": "gradio.FileData"}, "orig_name": "planted.md"}], None]}, timeout=30)
        status = html.unescape(_stream(url, response))
        assert "planted.md: not a file received by this server in an upload" in status, status
    finally:
        shutil.rmtree(planted.parent)


def test_uploads_are_stored_by_owner_and_content(secure_app, tmp_path) -> None:
    from gradio_client import Client, handle_file

    url, folder = secure_app

    def notes(where: str, text: str) -> str:
        path = tmp_path / where / "notes.md"
        path.parent.mkdir(parents=True)
        path.write_text(text)
        return handle_file(str(path))

    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    alice_status, _ = alice.predict([notes("a1", "# Notes\n\nThe Zorblat protocol requires seven checks.\n"),
                                     notes("a2", "# Notes\n\nThe Zorblat protocol requires eleven checks.\n")],
                                    None, api_name="/upload")
    assert html.unescape(alice_status).count("added notes.md") == 2  # same name, one upload: both kept
    bob_status, _ = bob.predict([notes("b", "# Notes\n\nThe Zorblat protocol requires nine checks.\n")],
                                None, api_name="/upload")
    assert "added notes.md" in bob_status
    stored = sorted((folder / "uploads").rglob("notes.md"))
    assert len(stored) == 3 and len({p.parent.parent for p in stored}) == 2  # two owners, three documents
    before = {p: p.read_text() for p in stored}

    empty_status, _ = bob.predict([notes("e", "")], None, api_name="/upload")
    assert "refused notes.md: the file is empty" in html.unescape(empty_status)
    assert {p: p.read_text() for p in sorted((folder / "uploads").rglob("notes.md"))} == before  # untouched
    assert not list((folder / "uploads" / "in-flight").glob("*.json"))  # every upload finished its journal

    _, _, _, sources, _ = alice.predict("How many checks does the Zorblat protocol require?", "rag", None,
                                        api_name="/chat")
    shown = html.unescape(re.sub(r"<[^>]+>", " ", sources))
    assert "seven checks" in shown and "eleven checks" in shown  # both of alice's documents are indexed
    assert "upload: notes.md" in shown and "uploaded document" in shown  # and marked as uploads
    assert "nine checks" not in shown  # bob's upload is bob's: filtered by scope in the store

    _, _, _, sources, _ = bob.predict("How many checks does the Zorblat protocol require?", "rag", None,
                                      api_name="/chat")
    shown = html.unescape(re.sub(r"<[^>]+>", " ", sources))
    assert "nine checks" in shown and "seven checks" not in shown and "eleven checks" not in shown
    _, _, _, sources, _ = Client(url, verbose=False).predict(  # a third visitor: the shared knowledge base only
        "What is the starting dose of Cardivexin?", "rag", None, api_name="/chat")
    shown = html.unescape(re.sub(r"<[^>]+>", " ", sources))
    assert "Cardivexin" in shown and "Zorblat" not in shown


def test_one_flooder_among_twenty_users_is_told_to_wait(secure_app) -> None:
    url, _ = secure_app
    run = subprocess.run([sys.executable, "-m", "chatbot.load", "--url", url, "--users", "20", "--flooders", "1",
                          "--flood", "20", "--json"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    users, flooder = json.loads(run.stdout)["groups"]
    assert (users["asked"], users["answered"], users["failed"]) == (19, 19, 0), run.stdout
    assert users["median_s"] is not None and users["p95_s"] >= users["median_s"]
    assert flooder["told_to_wait"] >= 18 and flooder["failed"] == 0, run.stdout  # 2 may wait in the queue
    assert any("wait" in m for m in flooder["messages"]), run.stdout


def _big_document(path: Path, sections: int = 240) -> None:
    body = "\n\n".join(
        f"## Quibbleflux section {n}\n\n" + " ".join(f"The Quibbleflux memo, part {n}, line {k}, says to check "
                                                    f"reading {n * 31 + k} twice." for k in range(12))
        for n in range(sections))
    path.write_text(f"# Quibbleflux memo\n\n{body}\n")


def test_kill_during_an_upload_leaves_no_partial_document(tmp_path, session_data_dir) -> None:
    from gradio_client import Client, handle_file
    from core.store_edge import EdgeStore

    env = app_env(tmp_path)
    url, process = launch(tmp_path, session_data_dir, env)
    memo = tmp_path / "incoming" / "memo.md"
    memo.parent.mkdir()
    _big_document(memo)
    log = tmp_path / "app.log"
    try:
        Client(url, verbose=False).submit([handle_file(str(memo))], None, api_name="/upload")
        deadline = time.time() + 300
        while not re.search(r"embedded (6[4-9]|[7-9]\d|\d{3,})/\d+ chunks", log.read_text()):
            assert time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        process.kill()  # kill -9 in the middle of the upload's ingest
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            stop(process)
    written = re.findall(r"embedded (\d+)/(\d+) chunks", log.read_text())[-1]
    assert int(written[0]) < int(written[1])  # it really was cut off part-way
    assert list((tmp_path / "uploads" / "in-flight").glob("*.json"))  # the journal knows

    url, process = launch(tmp_path, session_data_dir, env)  # the restart finishes or rolls back
    try:
        assert "rolled back the interrupted upload" in log.read_text()
        _, _, _, sources, _ = Client(url, verbose=False).predict(
            "What does the Quibbleflux memo say about checking readings?", "rag", None, api_name="/chat")
        assert "Quibbleflux" not in sources and "uploaded document" not in sources
    finally:
        stop(process)
    assert not list((tmp_path / "uploads").rglob("memo.md"))  # file and index agree: both gone
    assert not list((tmp_path / "uploads" / "in-flight").glob("*.json"))
    store = EdgeStore.open(str(tmp_path / "qdrant"), "ragtune")
    try:
        points = [r for r in store.scroll(store.physical_name(), fields=["title"])
                  if r.payload["metadata"].get("title") == "Quibbleflux memo"]
        assert points == []  # not one chunk of the partial document is left
    finally:
        store.close()
