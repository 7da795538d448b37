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


def test_rated_answers_come_with_their_question_history_and_sources(tmp_path: Path) -> None:
    memory = ChatMemory(tmp_path / "chat.sqlite3")
    alices = memory.create("user:alice")
    memory.append("user:alice", alices, "user", "What is HTN?", mode="rag")
    first = memory.append("user:alice", alices, "assistant", "Hypertension [1].", mode="rag",
                          sources=[{"n": 1, "title": "Glossary", "source": "g.md", "text": "HTN: hypertension"}])
    memory.append("user:alice", alices, "user", "And T2DM?", mode="base")
    second = memory.append("user:alice", alices, "assistant", "Type 2 diabetes.", mode="base")
    bobs = memory.create("browser:b0b")
    memory.append("browser:b0b", bobs, "user", "Unrated?")
    memory.append("browser:b0b", bobs, "assistant", "Nobody rated this.")
    assert memory.set_feedback("user:alice", second, -1) and memory.set_feedback("user:alice", first, 1)

    rated = memory.rated_answers()
    assert [(r.message_id, r.feedback, r.owner) for r in rated] == [(first, 1, "user:alice"), (second, -1, "user:alice")]
    assert (rated[0].question, rated[0].history, rated[0].sources[0]["source"]) == ("What is HTN?", [], "g.md")
    assert (rated[1].question, rated[1].mode) == ("And T2DM?", "base")
    assert rated[1].history == [("What is HTN?", "Hypertension [1].")] == memory.turns("user:alice", alices)[:1]
    memory.set_feedback("user:alice", first, None)  # a cleared thumb is no feedback
    assert [r.message_id for r in memory.rated_answers()] == [second]
