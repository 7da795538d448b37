"""Issue 15 against one launched app: the OpenAI-compatible API through the official ``openai``
client and LangChain's ``ChatOpenAI``, conversation export and delete over HTTP, and the Compare
tab (plus the page's download link) in real headless Chromium."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest

from tests.integration.test_app import stop
from tests.integration.test_browser_security import BROWSER_ARGS
from tests.integration.test_embed import ARTIFACTS, CHROMIUM, QUESTION, launch
from tests.integration.test_security import app_env

API_KEY = "test-key-0123456789abcdef"
MODES = ["hybrid", "rag", "finetuned", "base"]


@pytest.fixture(scope="module")
def api_app(tmp_path_factory, session_data_dir):
    folder = tmp_path_factory.mktemp("api")
    keys = json.dumps([{"key": API_KEY, "user": "apitester"}])
    url, process = launch(folder, session_data_dir, app_env(folder) | {"RAGTUNE_SERVER__API_KEYS": keys})
    yield url, folder
    stop(process)


def test_openai_and_langchain_clients_get_streamed_answers_with_sources_and_history(api_app) -> None:
    import openai
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_openai import ChatOpenAI

    url, folder = api_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    assert sorted(m.id for m in client.models.list()) == sorted(f"ragtune-{m}" for m in MODES)

    # with keys set, no key or a wrong one is 401, in OpenAI's error shape
    for key in (None, "wrong-key-0123456789"):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        refused = httpx.get(f"{url}/v1/models", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
    bad = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {API_KEY}"},
                     json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "model_not_found"

    # a streamed answer: tokens as they come, the sources on the last chunk and as references
    first_question = "What is Cardivexin used for?"
    chunks = list(client.chat.completions.create(
        model="ragtune-rag", messages=[{"role": "user", "content": first_question}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 4 and chunks[-1].choices[0].finish_reason == "stop"
    sources = chunks[-1].model_extra["sources"]
    assert sources and sources[0]["source"].endswith("cardivexin.md")
    assert set(sources[0]) == {"n", "title", "source", "page", "section", "score", "cited"}
    references = text.split("\n\nSources:\n", 1)[1].splitlines()
    assert len(references) == len(sources) and references[0].startswith(f"[1] {sources[0]['title']}")
    assert all(line.endswith(source["source"]) for line, source in zip(references, sources))
    first_answer = text.split("\n\nSources:")[0]

    # a follow-up with the history in the request: the search query keeps the drug's name
    history = [{"role": "user", "content": first_question}, {"role": "assistant", "content": first_answer}]
    follow = client.chat.completions.create(
        model="ragtune-rag", messages=[*history, {"role": "user", "content": "What is its usual dose?"}])
    extension = follow.model_extra
    assert "Cardivexin" in extension["ragtune"]["query"], extension["ragtune"]
    alone = client.chat.completions.create(  # the control: no history, no drug name in the query
        model="ragtune-base", messages=[{"role": "user", "content": "What is its usual dose?"}])
    assert alone.model_extra["ragtune"]["query"] == "What is its usual dose?"

    # LangChain's ChatOpenAI, streaming, the same follow-up as LangChain messages
    chat = ChatOpenAI(base_url=f"{url}/v1", api_key=API_KEY, model="ragtune-rag", max_retries=0, timeout=180)
    pieces = list(chat.stream([HumanMessage(first_question), AIMessage(first_answer),
                               HumanMessage("What is its usual dose?")]))
    streamed = "".join(str(p.content) for p in pieces)
    assert len(pieces) > 4 and "\n\nSources:\n[1] " in streamed and "cardivexin.md" in streamed

    # export and delete over the API: the stored follow-up, then gone from the list, SQLite and /v1
    auth = {"authorization": f"Bearer {API_KEY}"}
    conversation = extension["conversation_id"]
    assert conversation in [c["id"] for c in httpx.get(f"{url}/v1/conversations", headers=auth).json()["data"]]
    exported = httpx.get(f"{url}/v1/conversations/{conversation}", headers=auth).json()
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][1]["sources"][0]["source"].endswith("cardivexin.md")
    markdown = httpx.get(f"{url}/v1/conversations/{conversation}?format=md", headers=auth).text
    assert "What is its usual dose?" in markdown and "cardivexin.md" in markdown
    assert httpx.delete(f"{url}/v1/conversations/{conversation}", headers=auth).json()["deleted"] is True
    assert conversation not in [c["id"] for c in httpx.get(f"{url}/v1/conversations", headers=auth).json()["data"]]
    assert httpx.get(f"{url}/v1/conversations/{conversation}", headers=auth).status_code == 404
    gone = httpx.post(f"{url}/v1/chat/completions", headers=auth, json={
        "model": "ragtune-rag", "conversation_id": conversation, "messages": [{"role": "user", "content": "And?"}]})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "conversation_not_found"
    with sqlite3.connect(folder / "chat.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM messages WHERE conversation_id = ?", (conversation,)).fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM conversations WHERE id = ?", (conversation,)).fetchone() == (0,)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_compare_tab_answers_in_all_four_modes_and_the_page_downloads_and_deletes(api_app) -> None:
    from playwright.sync_api import sync_playwright

    url, _ = api_app
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(f"{url}/")
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-question textarea:not([disabled])").wait_for(timeout=120_000)
        note = page.locator("#compare-note")
        assert "favour rag" in note.inner_text()  # settings.yaml's chat.default_mode
        report = page.request.get(f"{url}/{note.locator('a').get_attribute('href')}")
        assert report.ok and "python -m evals" in report.text()  # the link opens the evals report
        page.locator("#compare-question textarea").fill(QUESTION)
        page.locator("#compare-send").click()
        for mode in MODES:  # every column ends with its total time
            page.locator(f"#compare-{mode}-time").get_by_text("total").wait_for(timeout=240_000)
        for mode in MODES:
            assert page.locator(f"#compare-{mode}-answer").inner_text().strip(), mode
        for mode in ("rag", "hybrid"):  # the retrieving modes show their evidence
            assert "cardivexin.md" in page.locator(f"#compare-{mode}-sources").inner_text()
        page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)

        # the chat tab: ask, download the open conversation through its signed link, delete it
        page.get_by_role("tab", name="Chat").click()
        page.locator("#question textarea").fill("What does HTN mean?")
        page.locator("#mode").get_by_text("base", exact=True).click()
        page.locator("#send").click()
        link = page.locator("#download-json")
        link.wait_for(timeout=180_000)
        href = link.get_attribute("href")
        exported = page.request.get(f"{url}/{href}").json()
        assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
        assert exported["messages"][0]["content"] == "What does HTN mean?"
        assert page.request.get(f"{url}/download/{'x' * 40}.{'y' * 20}").status == 404  # no forged grants
        page.locator("#delete").click()
        page.locator("#download-json").wait_for(state="detached", timeout=30_000)
        assert page.request.get(f"{url}/{href}").status == 404  # the grant is valid, the conversation is gone
        browser.close()
