"""The feedback loop end to end: the launched app's thumbs -> prepare --from-feedback -> KTO -> hybrid chat.

The questions go through the official gradio_client (the /chat endpoint). The thumbs cannot: the
Chatbot's like event carries Gradio's event data (which message, liked or not), which
gradio_client has no way to send, and the app keeps it off the public API (api_name=False). So the
test sends what the browser sends for a click on the thumb: a queue join for that event with its
event data, in the same Gradio session as the question, and reads the event's completion from
the session's stream. Everything else is real: the app process, its SQLite memory, the CLI, TRL,
llama.cpp serving the exported LoRA.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.settings import load_settings
from tests.conftest import DEMO, REPO
from tests.integration.test_app import _env, _free_port, _final, stop

QUESTIONS = ["What is the starting dose of Cardivexin?", "And the maximum dose?", "What is Glucarnil used for?"]


def like(client, url: str, message_index: int, liked: bool) -> None:
    """A click on the thumb under chat message ``message_index``, as the page sends it."""
    chatbot = next(c["id"] for c in client.config["components"] if c.get("props", {}).get("elem_id") == "chat")
    fn_index = next(d.get("id", i) for i, d in enumerate(client.config["dependencies"])
                    if [chatbot, "like"] in [list(t) for t in d["targets"]])
    joined = httpx.post(f"{url}/gradio_api/queue/join", json={
        "data": [None, None, None], "fn_index": fn_index, "trigger_id": chatbot, "session_hash": client.session_hash,
        "event_data": {"index": message_index, "value": None, "liked": liked},
    }, timeout=30)
    assert joined.status_code == 200, joined.text
    event_id = joined.json()["event_id"]
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": client.session_hash},
                      timeout=60) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("event_id") == event_id and message.get("msg") == "process_completed":
                assert message.get("success"), message
                return
    pytest.fail("the like event did not complete")


def test_thumbs_in_the_app_train_an_adapter_that_the_chat_serves(tmp_path: Path, session_data_dir: Path) -> None:
    from gradio_client import Client

    timings = {"start": time.time()}
    corpus = tmp_path / "corpus"  # two monographs: the app indexes them on first start in seconds
    corpus.mkdir()
    for name in ("cardivexin.md", "glucarnil.md"):
        shutil.copy(DEMO / "monographs" / name, corpus / name)
    env = _env(session_data_dir, tmp_path) | {"RAGTUNE_CHAT__DEMO_CORPUS": str(corpus),
                                              "RAGTUNE_LLM__MAX_NEW_TOKENS": "32"}
    port = _free_port()
    with (tmp_path / "app.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "chatbot", "--port", str(port)], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 240
            while time.time() < deadline:
                assert process.poll() is None, (tmp_path / "app.log").read_text()
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(1)
            timings["app_up"] = time.time()
            first, second = Client(url, verbose=False), Client(url, verbose=False)  # two users
            # base mode: prompts without chunks are ~100 tokens, not ~700, which keeps the KTO step short
            # (test_finetune covers rated rag answers and their chunks).
            for client, question in ((first, QUESTIONS[0]), (first, QUESTIONS[1]), (second, QUESTIONS[2])):
                _final(client.submit(question, "base", None, api_name="/chat"))
            timings["asked"] = time.time()
            like(first, url, 1, True)  # chat messages: question 0, answer 1, question 2, answer 3
            like(first, url, 3, False)
            like(second, url, 1, True)
            timings["rated"] = time.time()
            first.close(), second.close()  # their heartbeat streams would hold the app's graceful stop
        finally:
            stop(process)  # the embedded store admits one process, and training wants the cores
        timings["stopped"] = time.time()

    from finetune.cli import main

    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(
        f"data_dir: {session_data_dir}\nqdrant: {{path: {tmp_path / 'qdrant'}}}\n"
        f"chat: {{history_db: {tmp_path / 'chat.sqlite3'}}}\nllm: {{max_new_tokens: 160}}\nfeedback: {{train_on: all}}\n")
    data = tmp_path / "feedback"
    assert main(["prepare", "--from-feedback", "--out", str(data), "--settings", str(settings_file), "--no-progress"]) == 0
    summary = json.loads((data / "summary.json").read_text())
    assert summary["rated_answers"]["liked"] == 2 and summary["rated_answers"]["disliked"] == 1
    kto = [json.loads(line) for split in ("train", "validation") for line in (data / "kto" / f"{split}.jsonl").read_text().splitlines()]
    assert sorted(row["label"] for row in kto) == [False, True, True]
    assert all(row["mode"] == "base" and row["prompt"][-1]["content"].endswith(tuple(QUESTIONS)) for row in kto)
    timings["prepared"] = time.time()

    config = tmp_path / "kto.yaml"
    config.write_text(
        f"name: app-feedback\nobjective: kto\ntrain_files: [{data / 'kto' / 'train.jsonl'}]\n"
        f"validation_files: [{data / 'kto' / 'validation.jsonl'}]\nlora: {{rank: 4, alpha: 8, dropout: 0.0}}\n"
        "learning_rate: 5.0e-4\nlr_scheduler: constant\nwarmup: 0.0\nbatch_size: 2\ngradient_accumulation: 1\n"
        "eval_batch_size: 1\ngroup_by_length: false\nmax_length: 2048\nmax_steps: 1\nsave_steps: 1\nlogging_steps: 1\n"
        "check_examples: 1\n")
    code = main(["train", "--config", str(config), "--settings", str(settings_file), "--no-progress", "--force",
                 "--set", "name=app-feedback"])
    adapter = session_data_dir / "adapters" / "app-feedback"
    assert code == 0 and (adapter / "adapter_model.gguf").is_file()
    timings["trained"] = time.time()
    metrics = json.loads((adapter / "metrics.json").read_text())
    assert metrics["objective"] == "kto" and metrics["steps"] == 1

    # The chat serves it: a runtime with llm.adapter pointed at it answers in hybrid with its LoRA.
    from chatbot.runtime import build_runtime

    settings = load_settings(settings_file, {"llm": {"adapter": str(adapter), "max_new_tokens": 16}})
    runtime = build_runtime(settings)
    try:
        answer = runtime.chain.ask(QUESTIONS[0], owner="user:tester", mode="hybrid")
        assert answer.mode == "hybrid" and answer.text and answer.refused is None
        assert runtime.generation.describe()["adapter_gguf"] == str(adapter / "adapter_model.gguf")
    finally:
        runtime.close()
    timings["asked_hybrid"] = time.time()
    print({k: round(v - timings["start"], 1) for k, v in timings.items()})
