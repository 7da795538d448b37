"""JSON Lines records with their line numbers, for every reader of JSONL input (ingest, Q/A
sets for fine-tuning and evals): one wording of what is wrong with a line, wherever it is read,
and one error that lists every bad line of a file at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class InputError(ValueError):
    """Input that cannot be used; the message names the file and the line or field."""


MAX_LISTED_PROBLEMS = 10


def raise_problems(problems: list[str], what: str) -> None:
    """One error listing every problem found (the first few), so a file is fixed in one pass."""
    if not problems:
        return
    listed = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    tail = f"\n  ... and {more} more" if more else ""
    raise InputError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(listed) + tail)


@dataclass(frozen=True)
class JsonLine:
    number: int  # 1-based line number in the file
    record: dict[str, Any] | None  # the JSON object, or None when the line is not one
    problem: str | None = None  # why ``record`` is None, e.g. "not valid JSON (... at column 3)"


def json_lines(text: str) -> Iterator[JsonLine]:
    """Each non-blank line: its object, or what is wrong with it. Blank lines are skipped."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield JsonLine(number, None, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(value, dict):
            yield JsonLine(number, None, f"a record must be a JSON object, not {type(value).__name__}")
            continue
        yield JsonLine(number, value)
