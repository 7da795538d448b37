"""Question sets for evals: the Q/A records of ``core.qa``, seen as the questions an eval asks.

The records and their rules (types, gold documents, PubMedQA's label and long answer, follow-ups,
what is malformed) are ``core.qa``'s, the same ones fine-tuning reads. Here a record becomes an
``EvalQuestion``: the fields an eval record carries (``reference``: the free-form reference,
PubMedQA's ``long_answer``; ``label``: a closed yes | no | maybe; ``gold``: a path under the
knowledge base or ``#<record id>``).

A malformed record is reported as ``path:line: reason`` and skipped; the rest is used.
Conversations are asked in turn order, starting where their first turn appears in the file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.qa import QARecord, read_qa


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
    stale_doc: str | None = None  # an update's older document, whose answer is out of date

    @classmethod
    def from_record(cls, record: QARecord) -> "EvalQuestion":
        return cls(
            id=record.id, question=record.question, reference=record.reference, label=record.label,
            gold=record.gold, type=record.type or ("yes/no/maybe" if record.is_pubmedqa else None),
            unanswerable=record.unanswerable, gold_page=record.gold_page,
            conversation_id=record.conversation_id, turn=record.turn, line=record.line,
            stale_doc=record.stale_doc,
        )

    def as_record_fields(self) -> dict[str, Any]:
        fields = {
            "id": self.id, "question": self.question, "type": self.type, "reference": self.reference,
            "label": self.label, "gold": self.gold, "gold_page": self.gold_page,
            "unanswerable": self.unanswerable, "conversation_id": self.conversation_id, "turn": self.turn,
        }
        # Only updates carry it, so the records of every other question keep their shape.
        return fields | ({"stale_doc": self.stale_doc} if self.stale_doc is not None else {})


@dataclass
class QuestionSet:
    path: Path
    questions: list[EvalQuestion]
    problems: list[str] = field(default_factory=list)  # "path:line: reason", one per skipped record
    lines: int = 0


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
    """Read a question set; malformed records are listed in ``problems`` and left out
    (InputError when the file cannot be read at all)."""
    loaded = read_qa(path)
    questions = [EvalQuestion.from_record(r) for r in loaded.records]
    return QuestionSet(path=loaded.path, questions=conversation_order(questions), problems=loaded.problems,
                       lines=loaded.lines)


def read_ids(path: Path) -> set[str]:
    """Question ids from a file: JSONL with an ``id`` field per line (e.g. a ``finetune
    prepare`` output such as ``sft/train.jsonl``), or plain text with one id per line."""
    ids: set[str] = set()
    # split("\n"), not splitlines(): a JSON string may hold U+2028 or U+0085, which splitlines() breaks at.
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
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
