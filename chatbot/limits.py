"""Rate limits per identity (OWASP LLM10, unbounded consumption), settings in ``limits``.

Measured before these existed: one anonymous client filled the 64-slot queue in 0.57 s and
blocked everyone for about 9 minutes; 300 wrong passwords took 0.19 s. So:

- ``QuestionLimiter`` is asked *before* a question enters Gradio's queue (the chat event's
  validator): an identity may have ``waiting_per_identity`` questions waiting or being answered,
  and ask ``questions_per_minute``; beyond that it is told how long to wait, and its requests
  never take a queue slot. A client is held under every key it has (its browser id or user, and
  its Gradio session), so dropping one of them does not reset its count.
- ``LoginGuard`` counts wrong passwords per address and per user name: each one is answered
  more slowly, and past ``login_failures`` in ``login_window_s`` sign-ins are refused for
  ``login_lockout_s`` (a right password included, or the lock-out would only slow guessing).

Hand-written (a deque per key): the limits need our identities and Gradio's queue hook, which
the ASGI rate-limit libraries (slowapi, limits) do not see. State is per process.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable

from core.settings import LimitSettings


class RateLimited(Exception):
    """Refused for now; ``wait_s`` says for how long (at least a second)."""

    def __init__(self, message: str, wait_s: float):
        super().__init__(message)
        self.wait_s = wait_s


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


class QuestionLimiter:
    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._asked: dict[str, deque[float]] = defaultdict(deque)  # admission times, last 60 s
        self._waiting: dict[str, list[float]] = defaultdict(list)  # admissions not yet released

    def admit(self, keys: Iterable[str]) -> None:
        """Let one question in under every key, or raise RateLimited (nothing is counted then).
        The caller releases the same keys when the answer ends."""
        keys = tuple(dict.fromkeys(k for k in keys if k))
        limits = self.settings
        with self._lock:
            now = self.clock()
            for key in keys:
                asked, waiting = self._asked[key], self._waiting[key]
                while asked and now - asked[0] >= 60:
                    asked.popleft()
                waiting[:] = [t for t in waiting if now - t < limits.waiting_expiry_s]
                if limits.waiting_per_identity and len(waiting) >= limits.waiting_per_identity:
                    raise RateLimited(
                        f"You already have {len(waiting)} question{'s' if len(waiting) != 1 else ''} waiting "
                        "for an answer. Please wait for it before asking another (a few seconds per answer).",
                        wait_s=5.0,
                    )
                if limits.questions_per_minute and len(asked) >= limits.questions_per_minute:
                    wait = 60 - (now - asked[0])
                    raise RateLimited(
                        f"You asked {len(asked)} questions in the last minute, the limit here. "
                        f"Please wait {_seconds(wait)} s before asking again.",
                        wait_s=wait,
                    )
            for key in keys:
                self._asked[key].append(now)
                self._waiting[key].append(now)

    def release(self, keys: Iterable[str]) -> None:
        """One question of these keys ended (answered, refused or failed): the oldest is let go."""
        with self._lock:
            for key in dict.fromkeys(keys):
                waiting = self._waiting.get(key)
                if waiting:
                    waiting.pop(0)
                if not waiting:
                    self._waiting.pop(key, None)

    def waiting(self, key: str) -> int:
        with self._lock:
            return len(self._waiting.get(key, []))


class LoginGuard:
    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._locked_until: dict[str, float] = {}

    def locked(self, keys: Iterable[str]) -> float | None:
        """Seconds left of a lock-out on any of ``keys``, or None."""
        with self._lock:
            now = self.clock()
            left = [until - now for k in keys if (until := self._locked_until.get(k)) is not None and until > now]
        return max(left) if left else None

    def failed(self, keys: Iterable[str]) -> float:
        """Record a wrong password; returns how long to delay the answer to it."""
        limits = self.settings
        with self._lock:
            now = self.clock()
            worst = 0
            for key in keys:
                failures = self._failures[key]
                while failures and now - failures[0] >= limits.login_window_s:
                    failures.popleft()
                failures.append(now)
                worst = max(worst, len(failures))
                if limits.login_failures and len(failures) >= limits.login_failures:
                    self._locked_until[key] = now + limits.login_lockout_s
                    failures.clear()
        return min(limits.login_delay_s * worst, 5.0)

    def succeeded(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


def lockout_message(wait_s: float) -> str:
    return f"Too many wrong passwords. Sign-in is locked; try again in {_seconds(wait_s)} s."
