"""JSON Lines records with their line numbers, for every reader of JSONL input (ingest, Q/A
sets for fine-tuning and evals): one wording of what is wrong with a line, wherever it is read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


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
