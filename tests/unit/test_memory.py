"""Chat memory in SQLite: persistence across a restart, and isolation between owners."""

from pathlib import Path

import pytest

from chatbot.memory import ChatMemory, ConversationNotFound


def test_conversation_survives_a_restart_with_its_sources(tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    memory = ChatMemory(db)
    conversation = memory.create("alice")
    memory.append("alice", conversation, "user", "What is HTN?", mode="rag")
    answer_id = memory.append("alice", conversation, "assistant", "Hypertension [1].", mode="rag",
                              sources=[{"n": 1, "title": "Glossary", "source": "g.md", "text": "HTN: hypertension",
                                        "score": 0.8, "cited": True}])
    assert memory.set_feedback("alice", answer_id, 1)

    reopened = ChatMemory(db)  # a new process would do exactly this
    messages = reopened.messages("alice", conversation)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[1].sources[0]["title"] == "Glossary" and messages[1].feedback == 1
    assert reopened.turns("alice", conversation) == [("What is HTN?", "Hypertension [1].")]
    assert [c.title for c in reopened.list("alice")] == ["What is HTN?"]


def test_owners_are_isolated(tmp_path: Path) -> None:
    memory = ChatMemory(tmp_path / "chat.sqlite3")
    alices = memory.create("alice")
    memory.append("alice", alices, "user", "secret question")
    answer_id = memory.append("alice", alices, "assistant", "secret answer")

    with pytest.raises(ConversationNotFound):
        memory.messages("bob", alices)
    with pytest.raises(ConversationNotFound):
        memory.append("bob", alices, "user", "injected")
    assert not memory.set_feedback("bob", answer_id, -1)
    assert memory.list("bob") == []
    assert [m.content for m in memory.messages("alice", alices)] == ["secret question", "secret answer"]
    assert memory.messages("alice", alices)[1].feedback is None
