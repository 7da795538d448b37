"""Chat memory: conversations, their messages, each answer's sources and feedback, in SQLite.

Hand-written on the standard library's sqlite3 rather than LangChain's SQLChatMessageHistory:
that class stores bare messages, while ragtune also needs an owner per conversation (one user
must never read or write another's), the sources of each answer (citations must survive a
reload), feedback on a message, and a list of a user's past conversations.

Ownership is checked in every query (``WHERE owner = ?``): a conversation id that belongs to
someone else behaves exactly like one that does not exist. The one exception is
``rated_answers``, which reads every owner's thumbs for the training export (``python -m finetune
prepare --from-feedback``, which applies the ``feedback`` settings' opt-in); no page calls it.

A conversation can be exported whole (``export``: every message with its sources and feedback,
as JSON or, through ``export_markdown``, as Markdown) and deleted (``delete``: its rows are
removed with ``secure_delete`` on and the WAL checkpointed, so the text does not linger in the
file). The page offers both through signed download links (chatbot/downloads.py), the CLI as
``python -m chatbot export|delete ID``, the API as ``/v1/conversations/ID``.

A question whose answer never came (the server was killed while it was being answered) gets,
at the next start, an assistant message with status ``interrupted`` that says so: the page
shows it, and the chain leaves that turn out of the history it gives the model.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.text import clean_text

INTERRUPTED = "interrupted"
EXPORT_FORMAT = "ragtune.conversation.v1"  # the JSON export's shape, named so a reader can check it
INTERRUPTED_TEXT = "This answer was interrupted: the server stopped before it was finished. Please ask again."
_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_owner ON conversations (owner, updated);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    mode TEXT,
    sources TEXT NOT NULL DEFAULT '[]',
    feedback INTEGER CHECK (feedback IN (-1, 1)),
    created REAL NOT NULL,
    status TEXT
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id, id);
"""


class ConversationNotFound(KeyError):
    """No such conversation for this owner (whether it exists for another owner is not said)."""


@dataclass
class StoredMessage:
    id: int
    role: str
    content: str
    mode: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    feedback: int | None = None
    status: str | None = None  # None, or INTERRUPTED


@dataclass
class RatedAnswer:
    """An answer someone gave a thumbs up or down, with what the model was given for it."""

    message_id: int
    owner: str
    conversation_id: str
    question: str  # the user message it answers
    answer: str
    mode: str | None
    sources: list[dict[str, Any]]  # the chunks in its prompt, as stored beside the answer
    feedback: int  # 1 liked, -1 disliked
    history: list[tuple[str, str]]  # the conversation's earlier (question, answer) pairs


@dataclass
class ConversationSummary:
    id: str
    title: str
    updated: float


class ChatMemory:
    """Persistent conversations in one SQLite file (WAL mode: readers never block the writer)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
            if "status" not in columns:  # a database from before interrupted answers were marked
                db.execute("ALTER TABLE messages ADD COLUMN status TEXT")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe across Gradio's worker threads.
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA foreign_keys=ON")
        try:
            with db:
                yield db
        finally:
            db.close()

    # -- conversations -----------------------------------------------------------------------
    def create(self, owner: str, title: str = "New conversation") -> str:
        conversation_id = uuid.uuid4().hex  # unguessable: the id alone grants nothing anyway
        now = time.time()
        with self._connect() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, title, created, updated) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, owner, _title(title), now, now),
            )
        return conversation_id

    def exists(self, owner: str, conversation_id: str) -> bool:
        with self._connect() as db:
            row = db.execute(
                "SELECT 1 FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
            ).fetchone()
        return row is not None

    def list(self, owner: str, limit: int = 50) -> list[ConversationSummary]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, title, updated FROM conversations WHERE owner = ? ORDER BY updated DESC LIMIT ?",
                (owner, limit),
            ).fetchall()
        return [ConversationSummary(*row) for row in rows]

    # -- messages ----------------------------------------------------------------------------
    def messages(self, owner: str, conversation_id: str) -> list[StoredMessage]:
        self._require(owner, conversation_id)
        with self._connect() as db:
            rows = db.execute(
                "SELECT m.id, m.role, m.content, m.mode, m.sources, m.feedback, m.status FROM messages m "
                "JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.conversation_id = ? AND c.owner = ? ORDER BY m.id",
                (conversation_id, owner),
            ).fetchall()
        return [StoredMessage(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in rows]

    def turns(self, owner: str, conversation_id: str) -> list[tuple[str, str]]:
        """(question, answer) pairs, oldest first: what the chain feeds back as history."""
        pairs: list[tuple[str, str]] = []
        pending: str | None = None
        for message in self.messages(owner, conversation_id):
            if message.role == "user":
                pending = message.content
            elif pending is not None:
                if message.status != INTERRUPTED:  # no answer to learn from
                    pairs.append((pending, message.content))
                pending = None
        return pairs

    def append(
        self,
        owner: str,
        conversation_id: str,
        role: str,
        content: str,
        mode: str | None = None,
        sources: list[dict[str, Any]] | None = None,
    ) -> int:
        self._require(owner, conversation_id)
        content = clean_text(content)  # no NUL or control characters in storage, nor in titles
        now = time.time()
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, role, content, mode, sources, created) VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, mode, json.dumps(sources or []), now),
            )
            if role == "user":
                # The first question names the conversation in the list of past conversations.
                db.execute(
                    "UPDATE conversations SET title = ? WHERE id = ? AND title = 'New conversation'",
                    (_title(content.strip().splitlines()[0][:80]) if content.strip() else "New conversation",
                     conversation_id),
                )
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
            return int(cursor.lastrowid)

    def set_feedback(self, owner: str, message_id: int, value: int | None) -> bool:
        """Thumbs up (1) / down (-1) / cleared (None) on an assistant message the owner can see."""
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE messages SET feedback = ? WHERE id = ? AND role = 'assistant' AND conversation_id IN "
                "(SELECT id FROM conversations WHERE owner = ?)",
                (value, message_id, owner),
            )
            return cursor.rowcount == 1

    # -- the training export (read-only, every owner) -----------------------------------------
    def rated_answers(self) -> list[RatedAnswer]:
        """Every answer with feedback, in every owner's conversations, in message order, each with
        its question and earlier turns paired as ``turns`` pairs them for the chain."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT m.id, c.owner, m.conversation_id, m.role, m.content, m.mode, m.sources, m.feedback "
                "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.conversation_id IN (SELECT conversation_id FROM messages WHERE feedback IS NOT NULL) "
                "ORDER BY m.conversation_id, m.id"
            ).fetchall()
        rated: list[RatedAnswer] = []
        conversation, pairs, pending = None, [], None
        for message_id, owner, conversation_id, role, content, mode, sources, feedback in rows:
            if conversation_id != conversation:
                conversation, pairs, pending = conversation_id, [], None
            if role == "user":
                pending = content
                continue
            if pending is None:
                continue  # an answer without a question: the chain never writes one
            if feedback is not None:
                rated.append(RatedAnswer(message_id, owner, conversation_id, pending, content, mode,
                                         json.loads(sources), feedback, list(pairs)))
            pairs.append((pending, content))
            pending = None
        return sorted(rated, key=lambda r: r.message_id)

    def mark_interrupted(self, before: float | None = None) -> int:
        """Give every question left without an answer (asked before ``before``, default now) an
        assistant message saying it was interrupted. Run at start, when nothing is in flight.
        Returns how many were marked."""
        before = time.time() if before is None else before
        with self._connect() as db:
            unanswered = db.execute(
                "SELECT q.id, q.conversation_id, q.mode FROM messages q WHERE q.role = 'user' AND q.status IS NULL "
                "AND q.created < ? "
                "AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.conversation_id = q.conversation_id "
                "AND a.role = 'assistant' AND a.id > q.id AND NOT EXISTS (SELECT 1 FROM messages b "
                "WHERE b.conversation_id = q.conversation_id AND b.role = 'user' AND b.id > q.id AND b.id < a.id))",
                (before,),
            ).fetchall()
            for question_id, conversation_id, mode in unanswered:
                # Directly after its question: the id order is the conversation's order.
                later = db.execute("SELECT 1 FROM messages WHERE conversation_id = ? AND id > ?",
                                   (conversation_id, question_id)).fetchone()
                if later is None:
                    db.execute(
                        "INSERT INTO messages (conversation_id, role, content, mode, sources, created, status) "
                        "VALUES (?, 'assistant', ?, ?, '[]', ?, ?)",
                        (conversation_id, INTERRUPTED_TEXT, mode, time.time(), INTERRUPTED),
                    )
                else:  # a later question exists: mark the gap without reordering ids
                    db.execute("UPDATE messages SET status = ? WHERE id = ?", (INTERRUPTED, question_id))
        return len(unanswered)

    # -- export and delete -------------------------------------------------------------------
    def export(self, owner: str, conversation_id: str) -> dict[str, Any]:
        """The whole conversation as plain data: every message with its sources and feedback.
        Raises ConversationNotFound (also for another owner's id)."""
        self._require(owner, conversation_id)
        with self._connect() as db:
            title, created, updated = db.execute(
                "SELECT title, created, updated FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner),
            ).fetchone()
            rows = db.execute(
                "SELECT id, role, content, mode, sources, feedback, status, created FROM messages "
                "WHERE conversation_id = ? ORDER BY id", (conversation_id,),
            ).fetchall()
        return {
            "format": EXPORT_FORMAT, "id": conversation_id, "title": title, "created": created, "updated": updated,
            "messages": [
                {"id": r[0], "role": r[1], "content": r[2], "mode": r[3], "sources": json.loads(r[4]),
                 "feedback": r[5], "status": r[6], "created": r[7]}
                for r in rows
            ],
        }

    def delete(self, owner: str, conversation_id: str) -> bool:
        """Remove the conversation, its messages, their sources and feedback from the database
        file itself: ``secure_delete`` overwrites the freed pages with zeros, and a WAL
        checkpoint moves that into the main file and empties the log, where the old pages would
        otherwise linger. False when the owner has no such conversation."""
        with self._connect() as db:
            db.execute("PRAGMA secure_delete=ON")
            found = db.execute(
                "SELECT 1 FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
            ).fetchone()
            if found is None:
                return False
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner))
        db = sqlite3.connect(self.path, timeout=30)
        try:  # outside the transaction: a checkpoint cannot run inside one
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
        return True

    def _require(self, owner: str, conversation_id: str) -> None:
        if not self.exists(owner, conversation_id):
            raise ConversationNotFound(conversation_id)


def export_markdown(export: dict[str, Any]) -> str:
    """A conversation export (``ChatMemory.export``) as Markdown a person can read and keep."""
    lines = [f"# {export['title']}", "",
             f"Conversation `{export['id']}`, exported from ragtune on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    for message in export["messages"]:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(message["created"]))
        if message["role"] == "user":
            lines += [f"## Question ({when})", "", message["content"], ""]
            continue
        mode = f", {message['mode']}" if message["mode"] else ""
        lines += [f"### Answer ({when}{mode})", ""]
        if message["status"] == INTERRUPTED:
            lines += ["*(interrupted)*", ""]
        lines += [message["content"], ""]
        if message["feedback"] is not None:
            lines += [f"Feedback: {'👍 liked' if message['feedback'] == 1 else '👎 disliked'}", ""]
        if message["sources"]:
            lines.append("Sources:")
            for source in message["sources"]:
                where = "".join(f", {k} {source[k]}" for k in ("page", "section") if source.get(k))
                cited = " (cited)" if source.get("cited") else ""
                lines.append(f"- [{source.get('n')}] {source.get('title')}, {source.get('source')}{where}, "
                             f"score {source.get('score')}{cited}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _title(text: str) -> str:
    return " ".join(clean_text(text, multiline=False).split())[:120] or "New conversation"
