"""Question/answer records: the JSONL files that ``prepare`` and ``embeddings`` read.

Two layouts are accepted, one model for both:

- the demo sets (``data/demo/qa/*.jsonl``): ``id``, ``question``, ``answer``, ``gold_doc`` (a path
  relative to data/demo such as ``monographs/cardivexin.md`` or ``faq/staff-faq.jsonl#faq-002``;
  null for an unanswerable question), ``gold_page``, ``type``, and ``conversation_id`` / ``turn``
  for follow-ups;
- PubMedQA (``../shared/data/pubmedqa/dev.jsonl``): ``id`` (the PMID of the gold abstract),
  ``question``, ``answer`` (yes / no / maybe), ``long_answer``.

A record that has a ``gold_doc`` key finds its gold document by source path; one without it
finds it by ``metadata.record_id == id`` (how ingest stores JSONL record ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.jsonl import json_lines
from finetune.files import InputError, raise_problems

RecordType = Literal["factual", "abbreviation", "followup", "unanswerable"]


class QARecord(BaseModel):
    # Unknown fields are the data set's own business (PubMedQA and the demo differ); a typo in a
    # known one is caught by its type.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answer: str = ""
    long_answer: str | None = None
    gold_doc: str | None = None
    gold_page: int | None = None
    type: RecordType | None = None
    conversation_id: str | None = None
    turn: int | None = None
    where: str = Field("", exclude=True)  # "file:line", for messages about this record

    @field_validator("id", "conversation_id", mode="before")
    @classmethod
    def _ids_as_text(cls, value: object) -> object:
        # PubMedQA ids are strings, hand-written sets often use numbers: both mean the same id.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def gold_by_source(self) -> bool:
        return "gold_doc" in self.model_fields_set

    @property
    def unanswerable(self) -> bool:
        return self.type == "unanswerable" or (self.gold_by_source and not self.gold_doc)

    @property
    def followup(self) -> bool:
        return self.type == "followup" or (self.turn is not None and self.turn > 1)

    def answer_text(self) -> str:
        """The answer as the model should say it: the label first, so an eval can read it.

        PubMedQA's ``answer`` is a bare label and ``long_answer`` the explanation:
        "yes" + "X was..." -> "Yes. X was...".
        """
        if not self.long_answer:
            return self.answer
        label = self.answer.rstrip(".").strip()
        return f"{label[:1].upper()}{label[1:]}. {self.long_answer}"


def _format_validation(exc: ValidationError) -> str:
    return "; ".join(
        f"field {'.'.join(str(p) for p in err['loc']) or '(record)'!r}: {err['msg']}" for err in exc.errors()
    )


def load_qa(path: Path) -> list[QARecord]:
    """Read and validate a Q/A file; every bad line is reported at once, naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such Q/A file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    records: list[QARecord] = []
    problems: list[str] = []
    first_line_of: dict[str, int] = {}
    for line in json_lines(text):
        number, raw = line.number, line.record
        where = f"{path}:{number}"
        if raw is None:
            problems.append(f"{where}: {line.problem}")
            continue
        raw.pop("where", None)
        try:
            record = QARecord.model_validate(raw)
        except ValidationError as exc:
            problems.append(f"{where}: {_format_validation(exc)}")
            continue
        record.where = where
        if not record.answer and not record.unanswerable:
            problems.append(f"{where}: field 'answer' is empty (only an unanswerable record may omit it)")
            continue
        if record.id in first_line_of:
            problems.append(f"{where}: duplicate id {record.id!r} (first on line {first_line_of[record.id]})")
            continue
        first_line_of[record.id] = number
        records.append(record)
    raise_problems(problems, str(path))
    if not records:
        raise InputError(f"{path}: no Q/A records")
    return records


def check_disjoint(train: list[QARecord], validation: list[QARecord]) -> None:
    """A question in both splits would make the validation loss meaningless."""
    train_ids = {r.id: r.where for r in train}
    # Follow-ups ("And in children?") may repeat across conversations; standalone questions may not.
    train_questions = {r.question.casefold(): r.where for r in train if not r.followup}
    problems = [
        f"{r.where}: id {r.id!r} is also in the training file ({train_ids[r.id]})"
        for r in validation if r.id in train_ids
    ] + [
        f"{r.where}: the same question is in the training file ({train_questions[r.question.casefold()]})"
        for r in validation
        if r.id not in train_ids and not r.followup and r.question.casefold() in train_questions
    ]
    raise_problems(problems, "training and validation Q/A files overlap")
