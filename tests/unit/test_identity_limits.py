"""Browser ids that survive restarts and cannot be forged; per-identity question limits."""

from pathlib import Path

import pytest

from chatbot.identity import Identities
from chatbot.limits import QuestionLimiter, RateLimited
from chatbot.memory import INTERRUPTED, ChatMemory
from core.settings import LimitSettings


def test_browser_ids_are_signed_and_survive_a_restart(tmp_path: Path) -> None:
    secret = tmp_path / "secret.key"
    first = Identities.from_file(secret)
    token = first.mint()
    owner = first.browser_owner(token)
    assert owner and token.split(".")[0] not in owner  # the database never holds the credential
    assert secret.stat().st_mode & 0o077 == 0  # readable by the server's user only
    restarted = Identities.from_file(secret)  # a new process reads the same secret
    assert restarted.browser_owner(token) == owner
    assert restarted.browser_state_secret == first.browser_state_secret
    assert restarted.owner("alice", token) == "user:alice"  # a signed-in name wins
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for bad in (forged, "made-up", "", None, 42, {"path": "/etc/passwd"}, token + ".x"):
        assert restarted.browser_owner(bad) is None
    assert Identities.from_file(tmp_path / "other.key").browser_owner(token) is None


def test_question_limits_per_identity_with_the_wait_time() -> None:
    now = [1000.0]
    limiter = QuestionLimiter(LimitSettings(questions_per_minute=3, waiting_per_identity=2), clock=lambda: now[0])
    limiter.admit(["browser:a", "session:1"])
    limiter.admit(["browser:a", "session:1"])
    with pytest.raises(RateLimited, match="2 questions waiting"):
        limiter.admit(["browser:a", "session:2"])  # a new session does not reset the browser's share
    limiter.admit(["browser:b", "session:3"])  # others are not affected
    limiter.release(["browser:a", "session:1"])
    limiter.release(["browser:a", "session:1"])
    limiter.admit(["browser:a", "session:1"])
    limiter.release(["browser:a", "session:1"])
    now[0] += 20
    with pytest.raises(RateLimited, match="wait 40 s") as refused:
        limiter.admit(["browser:a"])
    assert 39 < refused.value.wait_s <= 40
    now[0] += 41
    limiter.admit(["browser:a"])  # the minute has passed


def test_unanswered_questions_are_marked_interrupted(tmp_path: Path) -> None:
    memory = ChatMemory(tmp_path / "chat.sqlite3")
    conversation = memory.create("alice")
    memory.append("alice", conversation, "user", "first\x00 question")
    memory.append("alice", conversation, "assistant", "first answer")
    memory.append("alice", conversation, "user", "second question")  # the server died here
    assert ChatMemory(tmp_path / "chat.sqlite3").mark_interrupted() == 1
    messages = memory.messages("alice", conversation)
    assert [(m.role, m.status) for m in messages][-1] == ("assistant", INTERRUPTED)
    assert memory.turns("alice", conversation) == [("first question", "first answer")]  # not fed to the model
    assert memory.mark_interrupted() == 0  # once
    assert memory.list("alice")[0].title == "first question"  # no NUL in titles
