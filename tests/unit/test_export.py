"""Conversation export and delete (issue 15) on a real SQLite file, and the download grants."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from chatbot.downloads import DownloadGrants
from chatbot.memory import EXPORT_FORMAT, ChatMemory, ConversationNotFound, export_markdown

SOURCE = {"n": 1, "title": "Cardivexin monograph", "source": "monographs/cardivexin.md", "text": "Start at 10 mg.",
          "score": 0.81, "page": None, "section": "Dosing", "cited": True}


def _conversation(memory: ChatMemory, owner: str = "alice", word: str = "Zyxquorble") -> tuple[str, int, int]:
    conversation = memory.create(owner)
    memory.append(owner, conversation, "user", f"{word} dose of Cardivexin?", mode="rag")
    first = memory.append(owner, conversation, "assistant", "Start at 10 mg [1].", mode="rag", sources=[SOURCE])
    memory.append(owner, conversation, "user", "And in HTN?", mode="hybrid")
    second = memory.append(owner, conversation, "assistant", "The documents do not cover this.", mode="hybrid")
    memory.set_feedback(owner, first, 1)
    memory.set_feedback(owner, second, -1)
    return conversation, first, second


def test_export_round_trips_every_message_source_and_feedback(tmp_path: Path) -> None:
    memory = ChatMemory(tmp_path / "chat.sqlite3")
    conversation, first, second = _conversation(memory)
    exported = json.loads(json.dumps(memory.export("alice", conversation)))  # what the JSON download holds
    assert exported["format"] == EXPORT_FORMAT and exported["id"] == conversation
    assert exported["title"] == "Zyxquorble dose of Cardivexin?"
    stored = memory.messages("alice", conversation)
    assert [(m["id"], m["role"], m["content"], m["mode"], m["sources"], m["feedback"]) for m in exported["messages"]] \
        == [(m.id, m.role, m.content, m.mode, m.sources, m.feedback) for m in stored]
    assert exported["messages"][1]["sources"] == [SOURCE] and exported["messages"][1]["feedback"] == 1
    assert exported["messages"][3]["feedback"] == -1
    markdown = export_markdown(exported)
    for text in ("# Zyxquorble dose of Cardivexin?", "Start at 10 mg [1].", "And in HTN?", "👍 liked", "👎 disliked",
                 "[1] Cardivexin monograph, monographs/cardivexin.md, section Dosing, score 0.81 (cited)"):
        assert text in markdown, text
    with pytest.raises(ConversationNotFound):
        memory.export("bob", conversation)  # another owner's id is as good as none


def test_delete_removes_it_from_the_list_the_tables_and_the_file_bytes(tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    memory = ChatMemory(db)
    conversation, _, _ = _conversation(memory)
    kept, _, _ = _conversation(memory, owner="bob", word="Plimbotrax")
    assert not memory.delete("bob", conversation)  # not bob's: nothing happens
    assert memory.delete("alice", conversation)
    assert memory.list("alice") == [] and not memory.delete("alice", conversation)
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT count(*) FROM conversations WHERE id = ?", (conversation,)).fetchone() == (0,)
        assert raw.execute("SELECT count(*) FROM messages WHERE conversation_id = ?", (conversation,)).fetchone() == (0,)
        assert raw.execute("SELECT count(*) FROM messages WHERE conversation_id = ?", (kept,)).fetchone() == (4,)
    # secure_delete + checkpoint: alice's words are in neither the database nor its WAL any more,
    # while bob's conversation is (so the byte search does see live rows)
    files = b"".join(p.read_bytes() for p in tmp_path.glob("chat.sqlite3*"))
    assert b"Zyxquorble" not in files and b"Plimbotrax" in files
    assert len(memory.export("bob", kept)["messages"]) == 4


def test_download_grants_open_one_conversation_of_one_owner_for_a_while(tmp_path: Path) -> None:
    now = [1000.0]
    grants = DownloadGrants(b"s" * 32, clock=lambda: now[0])
    grant = grants.issue("browser:abc", "conv1", "json", ttl_s=300)
    assert grants.check(grant) == ("browser:abc", "conv1", "json")
    payload, mac = grant.split(".")
    forged = DownloadGrants(b"s" * 32).issue("browser:evil", "conv1", "json").split(".")[0] + "." + mac
    assert grants.check(forged) is None  # a payload edited for another owner fails the signature
    assert DownloadGrants(b"t" * 32, clock=lambda: now[0]).check(grant) is None  # another server's secret
    assert grants.check("../../etc/passwd") is None and grants.check("a.b") is None
    now[0] += 301
    assert grants.check(grant) is None  # expired


def test_cli_exports_and_deletes_a_conversation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from chatbot.cli import CLI_OWNER, main

    db = tmp_path / "chat.sqlite3"
    conversation, _, _ = _conversation(ChatMemory(db), owner=CLI_OWNER)
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"data_dir: {tmp_path}\nchat:\n  history_db: {db}\n")
    assert main(["--settings", str(settings), "export", conversation, "--format", "json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert len(exported["messages"]) == 4 and exported["messages"][1]["sources"] == [SOURCE]
    assert main(["--settings", str(settings), "export", conversation]) == 0
    assert "Start at 10 mg [1]." in capsys.readouterr().out
    assert main(["--settings", str(settings), "delete", conversation]) == 0
    assert ChatMemory(db).list(CLI_OWNER) == []
    assert main(["--settings", str(settings), "export", conversation]) == 1
    assert f"no conversation {conversation}" in capsys.readouterr().err
