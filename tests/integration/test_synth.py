"""python -m finetune synth against a real index (the embedded store, the packaged embedder).

Two teachers: the packaged 135M model through the local llama.cpp backend (a weak teacher: the
test asserts the pipeline, the filters and the resumption, not its prose), and, for bad input and
the filters' counts, a tiny OpenAI-compatible endpoint played by stdlib http.server in a thread.
That stand-in is there because no real strong teacher can run here: it is driven through the
real ChatOpenAI client, and it answers as a broken one would (a timeout, non-JSON, an empty
answer, HTTP 500) and as a good one would (questions taken from the chunk itself).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.facts import numbers
from core.qa import read_qa
from finetune.cli import main
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, session_data_dir: Path, embedder) -> Path:
    """Two demo monographs in a local Qdrant folder; returns a settings file that points at it."""
    from core.settings import load_settings
    from core.store import open_store
    from ingest.service import build_indexer

    folder = tmp_path_factory.mktemp("synth")
    settings_file = folder / "settings.yaml"
    settings_file.write_text(f"data_dir: {session_data_dir}\nqdrant: {{path: {folder / 'qdrant'}}}\n")
    settings = load_settings(settings_file)
    store = open_store(settings)
    docs = [DEMO / "monographs" / "cardivexin.md", DEMO / "monographs" / "glucarnil.md"]
    assert build_indexer(settings, store, embedder).run(docs, progress=False).ok
    store.close()  # the CLI opens the folder itself (the embedded store admits one process)
    return settings_file


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]


def test_local_teacher_writes_filtered_records_and_a_rerun_asks_only_what_failed(index: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "synth"
    args = ["synth", "--out", str(out), "--settings", str(index), "--chunks", "1", "--seed", "3", "--no-progress",
            "--set", "synth.kinds=[factual, unanswerable]", "--set", "synth.teacher.max_new_tokens=80"]
    code = main(args)
    printed = capsys.readouterr().out
    assert code in (0, 1)  # 1: a teacher call failed (counted); the 135M model may write an empty field
    entries = journal(out)
    assert sorted(e["kind"] for e in entries) == ["factual", "unanswerable"]
    assert len({e["chunk_id"] for e in entries}) == 1
    filters = json.loads((out / "filters.json").read_text())
    assert "outcome" in printed and "kept" in printed and "qa.jsonl:" in printed  # the printed table
    # Every call is accounted for once (one item per call for these kinds): kept, hard, dropped or failed.
    hard_apart = sum(len(e["hard"]) for e in entries)
    assert sum(v["this_run"] for k, v in filters.items() if k != "hard") + hard_apart == len(entries) == 2
    failed = sum(e["status"] == "failed" for e in entries)
    # What was kept is a Q/A record every reader accepts, grounded in its chunk, with its gold document.
    chunks = {e["chunk_id"]: e["source"] for e in entries}
    qa = read_qa(out / "qa.jsonl")
    assert not qa.problems
    texts = _chunk_texts(index)
    for record in qa.records:
        raw = next(r for e in entries for r in e["kept"] if r["id"] == record.id)
        if record.unanswerable:
            continue
        assert record.gold_doc == chunks[raw["chunk_id"]]
        assert set(numbers(record.answer)) <= set(numbers(texts[raw["chunk_id"]]))
    for raw in (r for e in entries for r in e["hard"]):
        assert raw["hard"] is True and raw["gold_doc"]

    # Resumption: the same command again asks the teacher only for the calls that failed.
    before = (out / "qa.jsonl").read_bytes()
    code = main(args)
    capsys.readouterr()
    again = journal(out)
    assert len(again) == len(entries) + failed
    assert (out / "qa.jsonl").read_bytes().startswith(before)


def _chunk_texts(settings_file: Path) -> dict[str, str]:
    from core.settings import load_settings
    from core.store import open_store

    store = open_store(load_settings(settings_file))
    try:
        return {p.id: p.payload["page_content"] for p in store.scroll(store.physical_name())}
    finally:
        store.close()


# -- a broken teacher, and a good one: the stand-in endpoint ------------------------------------
class StandIn:
    """Plays an OpenAI-compatible /v1/chat/completions endpoint; replies follow ``script`` in order."""

    def __init__(self, script: list[str]):
        self.script = list(script)
        self.requests: list[dict] = []
        self.first_question: str | None = None
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append(body)
                step = stand_in.script.pop(0) if stand_in.script else "good"
                if step == "timeout":
                    time.sleep(2.5)  # past synth.teacher.timeout_s
                    return
                if step == "500":
                    self._send(500, {"error": {"message": "the model is overloaded", "type": "server_error"}})
                    return
                self._send(200, completion(stand_in.reply(step, body)))

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def reply(self, step: str, body: dict) -> str:
        passage = re.search(r"<<<\n(.*?)\n>>>", body["messages"][-1]["content"], re.S).group(1)
        sentence = next(s for s in re.split(r"(?<=[.!?])\s+|\n+", passage) if len(s.split()) >= 6).strip()
        question = f"What does the monograph say here: {sentence.rstrip('.')}?"
        if step == "non_json":
            return "Sure! Here is a question about the passage: what is the dose?"
        if step == "empty":
            return json.dumps({"question": "", "answer": ""})
        if step == "ungrounded":
            return json.dumps({"question": question, "answer": "Give 98765 mg every 3 minutes."})
        if step == "duplicate":  # the first good question again, answered from this chunk
            return json.dumps({"question": self.first_question, "answer": sentence})
        self.first_question = self.first_question or question
        return json.dumps({"question": question, "answer": sentence})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(content: str) -> dict:
    return {"id": "chatcmpl-standin", "object": "chat.completion", "created": 0, "model": "stand-in",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70}}


def test_a_broken_teacher_is_counted_the_run_goes_on_and_a_rerun_resumes(index: Path, tmp_path: Path, capsys) -> None:
    stand_in = StandIn(["timeout", "non_json", "good", "empty", "500", "ungrounded", "duplicate"])
    out = tmp_path / "synth"
    args = ["synth", "--out", str(out), "--settings", str(index), "--chunks", "7", "--no-progress",
            "--set", "synth.kinds=[factual]", "--set", "synth.teacher.backend=openai",
            "--set", f"synth.teacher.base_url={stand_in.url}", "--set", "synth.teacher.model=stand-in",
            "--set", "synth.teacher.timeout_s=1", "--set", "synth.teacher.retries=0"]
    try:
        assert main(args) == 1  # done, but calls failed
        captured = capsys.readouterr()
        assert "4 teacher call(s) failed" in captured.err and "rerun the same command" in captured.err
        for reason in ("teacher_timeout", "teacher_non_json", "teacher_empty", "teacher_refused: HTTP 500"):
            assert reason in captured.err, reason
        filters = json.loads((out / "filters.json").read_text())
        assert {k: v["this_run"] for k, v in filters.items()} == {
            "kept": 1, "hard": 0, "teacher_timeout": 1, "teacher_non_json": 1, "teacher_empty": 1,
            "teacher_refused": 1, "answer_numbers_not_in_chunk": 1, "near_duplicate": 1}
        assert stand_in.requests[0]["response_format"]["type"] == "json_schema"  # the schema was asked for
        (kept,) = read_qa(out / "qa.jsonl").records
        assert kept.type == "factual" and "monographs/" in kept.gold_doc and kept.gold_doc.endswith(".md")
        first = (out / "qa.jsonl").read_bytes()

        # A run killed between the journal and qa.jsonl leaves a torn line: the next run heals it.
        with (out / "qa.jsonl").open("a") as handle:
            handle.write('{"id": "torn", "quest')
        asked = len(stand_in.requests)
        assert main(args) == 0  # the endpoint has recovered: only the four failed calls are asked again
        capsys.readouterr()
        assert len(stand_in.requests) - asked == 4
        qa = read_qa(out / "qa.jsonl")
        assert not qa.problems and (out / "qa.jsonl").read_bytes().startswith(first)
        assert len(qa.records) >= 2 and kept.id in {r.id for r in qa.records}
        filters = json.loads((out / "filters.json").read_text())
        assert filters["teacher_timeout"] == {"all_runs": 1, "this_run": 0}
        assert filters["kept"]["all_runs"] == len(qa.records)

        # A third run has nothing left to ask; another seed in the same folder is refused, not mixed in.
        asked = len(stand_in.requests)
        assert main(args) == 0 and len(stand_in.requests) == asked
        assert main(args + ["--seed", "9"]) == 2
        assert "other seed" in capsys.readouterr().err
    finally:
        stand_in.close()
