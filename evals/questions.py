"""Question sets: the demo's Q/A JSONL and PubMedQA's, read into one ``EvalQuestion`` shape.

Demo (``data/demo/qa/*.jsonl``): ``id``, ``question``, ``answer``, ``gold_doc`` (a path
relative to the knowledge base, or null), ``gold_page``, ``type`` (factual | abbreviation |
followup | unanswerable), and ``conversation_id`` + ``turn`` for a multi-turn conversation.

PubMedQA (``../shared/data/pubmedqa/dev.jsonl``): ``id`` (the PMID of the abstract that answers
it), ``question``, ``answer`` (yes | no | maybe) and ``long_answer`` (the abstract's
conclusion). A record with ``long_answer`` is read this way: its label is ``answer``, its
free-form reference is ``long_answer``, and its gold document is the corpus record ``#<id>``
(ingest stores a JSONL record's source as ``<file>#<record id>``).

A malformed record is reported as ``path:line: reason`` and skipped; the rest is used.
Conversations are asked in turn order, starting where their first turn appears in the file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.jsonl import json_lines
from evals.metrics import closed_label

QUESTION_TYPES = ("factual", "abbreviation", "followup", "unanswerable")


@dataclass(frozen=True)
class EvalQuestion:
    id: str
    question: str
    reference: str | None  # free-form reference answer (PubMedQA: long_answer)
    label: str | None  # closed label: yes | no | maybe
    gold: str | None  # gold document: a path under the knowledge base, or "#<record id>"
    type: str | None = None
    unanswerable: bool = False
    gold_page: int | None = None
    conversation_id: str | None = None
    turn: int | None = None
    line: int = 0

    def as_record_fields(self) -> dict[str, Any]:
        return {
            "id": self.id, "question": self.question, "type": self.type, "reference": self.reference,
            "label": self.label, "gold": self.gold, "gold_page": self.gold_page,
            "unanswerable": self.unanswerable, "conversation_id": self.conversation_id, "turn": self.turn,
        }


@dataclass
class QuestionSet:
    path: Path
    questions: list[EvalQuestion]
    problems: list[str] = field(default_factory=list)  # "path:line: reason", one per skipped record
    lines: int = 0


class MalformedRecord(ValueError):
    pass


def _text(record: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise MalformedRecord(f"'{key}' must be a non-empty string, not {value!r}")
    return value.strip()


def parse_record(record: Any, line: int) -> EvalQuestion:
    """One JSON value -> EvalQuestion, or MalformedRecord saying what is wrong."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object, found {type(record).__name__}")
    raw_id = record.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
        raise MalformedRecord(f"'id' must be a non-empty string or number, not {raw_id!r}")
    question = _text(record, "question")
    answer = _text(record, "answer")
    if "long_answer" in record:  # PubMedQA
        label = closed_label(answer)
        if label is None:
            raise MalformedRecord(f"PubMedQA 'answer' must be yes, no or maybe, not {answer!r}")
        return EvalQuestion(
            id=str(raw_id).strip(), question=question, reference=_text(record, "long_answer", required=False),
            label=label, gold=f"#{str(raw_id).strip()}", type=record.get("type") or "yes/no/maybe", line=line,
        )

    kind = record.get("type")
    if kind is not None and kind not in QUESTION_TYPES:
        raise MalformedRecord(f"'type' must be one of {', '.join(QUESTION_TYPES)}, not {kind!r}")
    gold = record.get("gold_doc")
    if gold is not None and (not isinstance(gold, str) or not gold.strip()):
        raise MalformedRecord(f"'gold_doc' must be a path or null, not {gold!r}")
    page = record.get("gold_page")
    if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 1):
        raise MalformedRecord(f"'gold_page' must be a page number or absent, not {page!r}")
    conversation = record.get("conversation_id")
    turn = record.get("turn")
    if conversation is not None:
        if not isinstance(conversation, (str, int)) or not str(conversation).strip():
            raise MalformedRecord(f"'conversation_id' must be a string, not {conversation!r}")
        if isinstance(turn, bool) or not isinstance(turn, int) or turn < 1:
            raise MalformedRecord(f"a conversation turn needs 'turn' (1, 2, ...), not {turn!r}")
    elif kind == "followup":
        raise MalformedRecord("a followup needs 'conversation_id' and 'turn'")
    unanswerable = kind == "unanswerable"
    label = None if unanswerable else closed_label(answer)
    return EvalQuestion(
        id=str(raw_id).strip(), question=question,
        # A bare "Yes" is scored as a label; token overlap with one word would say nothing.
        reference=None if unanswerable or label else answer, label=label,
        gold=gold.strip() if isinstance(gold, str) else None, type=kind, unanswerable=unanswerable,
        gold_page=page, conversation_id=str(conversation).strip() if conversation is not None else None,
        turn=turn if conversation is not None else None, line=line,
    )


def conversation_order(questions: list[EvalQuestion]) -> list[EvalQuestion]:
    """File order, except that each conversation's turns come together, in turn order."""
    turns: dict[str, list[EvalQuestion]] = defaultdict(list)
    for q in questions:
        if q.conversation_id is not None:
            turns[q.conversation_id].append(q)
    ordered: list[EvalQuestion] = []
    for q in questions:
        if q.conversation_id is None:
            ordered.append(q)
        elif q.conversation_id in turns:
            ordered.extend(sorted(turns.pop(q.conversation_id), key=lambda t: t.turn or 0))
    return ordered


def load_questions(path: Path) -> QuestionSet:
    """Read a question set; malformed records are listed in ``problems`` and left out."""
    path = Path(path)
    questions: list[EvalQuestion] = []
    problems: list[str] = []
    seen_ids: dict[str, int] = {}
    seen_turns: dict[tuple[str, int], int] = {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for line in json_lines(text):
        number = line.number
        try:
            if line.record is None:
                raise MalformedRecord(str(line.problem))
            value = line.record
            question = parse_record(value, number)
            if question.id in seen_ids:
                raise MalformedRecord(f"duplicate id {question.id!r} (first on line {seen_ids[question.id]})")
            if question.conversation_id is not None:
                key = (question.conversation_id, question.turn or 0)
                if key in seen_turns:
                    raise MalformedRecord(
                        f"conversation {key[0]!r} has turn {key[1]} twice (first on line {seen_turns[key]})")
                seen_turns[key] = number
        except MalformedRecord as exc:
            problems.append(f"{path}:{number}: {exc}")
            continue
        seen_ids[question.id] = number
        questions.append(question)
    return QuestionSet(path=path, questions=conversation_order(questions), problems=problems, lines=len(lines))


def read_ids(path: Path) -> set[str]:
    """Question ids from a file: JSONL with an ``id`` field per line (e.g. a ``finetune
    prepare`` output such as ``sft/train.jsonl``), or plain text with one id per line."""
    ids: set[str] = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            value = json.loads(line).get("id")
            if value is not None:
                ids.add(str(value))
        else:
            ids.add(line)
    return ids


def select(questions: list[EvalQuestion], *, only: set[str] | None = None, exclude: set[str] | None = None,
           limit: int | None = None) -> list[EvalQuestion]:
    """Filter by id, then keep the first ``limit`` (a conversation cut short loses its later turns)."""
    chosen = [q for q in questions if (only is None or q.id in only) and not (exclude and q.id in exclude)]
    return chosen[:limit] if limit is not None else chosen
