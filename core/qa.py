"""The Q/A record: one model and one loader for every reader of a question set.

``finetune prepare`` and ``finetune embeddings`` train on these files, ``evals`` asks them; all
read them here, so a record means the same everywhere and a bad one is refused with the same
``file:line: reason`` everywhere. A reader chooses what happens to bad records, never what is bad:
``read_qa`` collects them and keeps the rest (evals: one bad question should not stop a run),
``load_qa`` raises one error listing them all (training: a silently skipped record is a silently
different model).

One JSON object a line (UTF-8, a byte-order mark is fine). Fields:

- ``id`` (string or number; compared as text), ``question``, ``answer``;
- ``type``: ``factual`` | ``abbreviation`` | ``followup`` (a later turn of a conversation) |
  ``unanswerable`` (the documents do not answer it; the target is NOT_COVERED) | ``update``
  (the answer changed in a newer document: ``gold_doc`` is the newer one and ``stale_doc``,
  optional, the older one whose answer is now wrong);
- ``gold_doc``: the document that answers it, a path relative to the knowledge base
  (``monographs/cardivexin.md``, ``faq/staff-faq.jsonl#faq-002``) or ``#<record id>`` for a JSONL
  record; ``null`` means "the documents do not answer this"; absent means "not recorded";
- ``gold_page`` (a PDF page, 1-based), ``stale_doc`` (see ``update``);
- ``conversation_id`` + ``turn`` (1, 2, ...): a multi-turn conversation, one record a turn;
- PubMedQA (``../shared/data/pubmedqa/dev.jsonl``): ``answer`` is the label yes | no | maybe and
  ``long_answer`` the explanation; its gold document is the corpus record ``#<id>`` (the PMID).

Other fields are the data set's own business and are ignored. The rules, in one place:
unanswerable = type ``unanswerable``, or no type and ``gold_doc: null``; a follow-up = type
``followup`` or any turn after the first; only an unanswerable record may leave ``answer`` empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from core.jsonl import InputError, json_lines, raise_problems

RecordType = Literal["factual", "abbreviation", "followup", "unanswerable", "update"]
RECORD_TYPES: tuple[str, ...] = RecordType.__args__  # type: ignore[attr-defined]
ANSWERABLE_TYPES = tuple(t for t in RECORD_TYPES if t != "unanswerable")

CLOSED_LABELS: tuple[str, ...] = ("yes", "no", "maybe")


def closed_label(answer: str | None) -> str | None:
    """A reference answer that is exactly a closed label ("Yes", "no.") -> the label, else None."""
    if not isinstance(answer, str):
        return None
    word = answer.strip().rstrip(".!").strip().lower()
    return word if word in CLOSED_LABELS else None


class QARecord(BaseModel):
    # Unknown fields are the data set's own business (PubMedQA and the demo differ); a wrong
    # value in a known one is caught by its type.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answer: str = ""
    long_answer: str | None = None
    type: RecordType | None = None
    gold_doc: str | None = Field(None, min_length=1)
    gold_page: StrictInt | None = Field(None, ge=1)
    stale_doc: str | None = Field(None, min_length=1)
    conversation_id: str | None = Field(None, min_length=1)
    turn: StrictInt | None = Field(None, ge=1)
    where: str = Field("", exclude=True)  # "file:line", for messages about this record
    line: int = Field(0, exclude=True)

    @field_validator("answer", mode="before")
    @classmethod
    def _no_answer_is_empty(cls, value: object) -> object:
        return "" if value is None else value  # "answer": null on an unanswerable record

    @field_validator("id", "conversation_id", mode="before")
    @classmethod
    def _ids_as_text(cls, value: object) -> object:
        # PubMedQA ids are strings, hand-written sets often use numbers: both mean the same id.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> "QARecord":
        if self.is_pubmedqa and closed_label(self.answer) is None:
            raise ValueError(f"PubMedQA 'answer' must be yes, no or maybe, not {self.answer!r}")
        if (self.conversation_id is None) != (self.turn is None):
            raise ValueError("a conversation turn needs both 'conversation_id' and 'turn' (1, 2, ...)")
        if self.type == "followup" and (self.turn is None or self.turn < 2):
            raise ValueError("a followup needs 'conversation_id' and 'turn' 2 or later (turn 1 opens the conversation)")
        if self.type == "unanswerable" and self.gold_doc is not None:
            raise ValueError(f"an unanswerable record names no gold_doc, not {self.gold_doc!r}")
        if self.type in ANSWERABLE_TYPES and "gold_doc" in self.model_fields_set and self.gold_doc is None:
            raise ValueError(f"gold_doc is null (no document answers it) but type is {self.type!r}: "
                             "name the gold document, leave gold_doc out, or type it 'unanswerable'")
        if self.type == "update" and self.gold_doc is None:
            raise ValueError("an update names the newer document that answers it in 'gold_doc'")
        if self.stale_doc is not None and (self.gold_doc is None or self.stale_doc == self.gold_doc):
            raise ValueError("'stale_doc' (the older document) needs a different 'gold_doc' (the newer one)")
        if self.gold_page is not None and self.gold is None:
            raise ValueError("'gold_page' needs a 'gold_doc'")
        if not self.answer and not self.unanswerable:
            raise ValueError("field 'answer' is empty (only an unanswerable record may omit it)")
        return self

    # -- what the record means, one definition each -----------------------------------------
    @property
    def is_pubmedqa(self) -> bool:
        return "long_answer" in self.model_fields_set

    @property
    def unanswerable(self) -> bool:
        return self.type == "unanswerable" or (
            self.type is None and "gold_doc" in self.model_fields_set and self.gold_doc is None
        )

    @property
    def followup(self) -> bool:
        return self.type == "followup" or (self.turn is not None and self.turn > 1)

    @property
    def gold(self) -> str | None:
        """The gold document: a path under the knowledge base, ``#<record id>``, or None."""
        if self.gold_doc is not None:
            return self.gold_doc
        return f"#{self.id}" if self.is_pubmedqa else None

    @property
    def gold_record_id(self) -> str | None:
        """The JSONL record id when the gold document is given as ``#<id>`` (ingest's record_id)."""
        gold = self.gold
        return gold[1:] if gold is not None and gold.startswith("#") else None

    @property
    def label(self) -> str | None:
        """The closed label (yes / no / maybe) when the answer is one; a bare "Yes." is scored as a
        label, since token overlap with one word would say nothing."""
        return None if self.unanswerable else closed_label(self.answer)

    @property
    def reference(self) -> str | None:
        """The free-form reference answer (PubMedQA: long_answer); None when there is only a label."""
        if self.is_pubmedqa:
            return self.long_answer or None
        return None if self.unanswerable or self.label else self.answer

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
    parts = []
    for err in exc.errors():
        if err["loc"]:
            parts.append(f"field {'.'.join(str(p) for p in err['loc'])!r}: {err['msg']}")
        else:  # a rule across fields (model_validator): its message names the fields itself
            parts.append(str(err["msg"]).removeprefix("Value error, "))
    return "; ".join(parts)


@dataclass
class QAFile:
    """A question set as read: the good records in file order, and one line per bad one."""

    path: Path
    records: list[QARecord]
    problems: list[str] = field(default_factory=list)  # "path:line: reason"
    lines: int = 0


def read_text(path: Path) -> str:
    """The file's text; InputError naming it when it is missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such Q/A file")
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM from a spreadsheet export is not a character
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_qa(path: Path) -> QAFile:
    """Validate every record; bad ones (and duplicates of an id or a conversation turn) are listed
    in ``problems`` and left out. A file that cannot be read at all raises InputError."""
    path = Path(path)
    text = read_text(path)
    records: list[QARecord] = []
    problems: list[str] = []
    first_line_of: dict[str, int] = {}
    turn_line: dict[tuple[str, int], int] = {}
    for line in json_lines(text):
        where = f"{path}:{line.number}"
        if line.record is None:
            problems.append(f"{where}: {line.problem}")
            continue
        raw = {k: v for k, v in line.record.items() if k not in ("where", "line")}
        try:
            record = QARecord.model_validate(raw)
        except ValidationError as exc:
            problems.append(f"{where}: {_format_validation(exc)}")
            continue
        record.where, record.line = where, line.number
        if record.id in first_line_of:
            problems.append(f"{where}: duplicate id {record.id!r} (first on line {first_line_of[record.id]})")
            continue
        if record.conversation_id is not None:
            key = (record.conversation_id, record.turn or 0)
            if key in turn_line:
                problems.append(f"{where}: conversation {key[0]!r} has turn {key[1]} twice "
                                f"(first on line {turn_line[key]})")
                continue
            turn_line[key] = line.number
        first_line_of[record.id] = line.number
        records.append(record)
    return QAFile(path=path, records=records, problems=problems, lines=len(text.splitlines()))


def load_qa(path: Path) -> list[QARecord]:
    """The records of a file with no bad record, or one InputError listing every bad line."""
    loaded = read_qa(path)
    raise_problems(loaded.problems, str(loaded.path))
    if not loaded.records:
        raise InputError(f"{loaded.path}: no Q/A records")
    return loaded.records


def check_disjoint(train: list[QARecord], validation: list[QARecord]) -> None:
    """A question in both splits would make a validation score meaningless."""
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
