"""python -m finetune synth: a teacher model writes Q/A records from the collection's own chunks.

RAFT (Zhang et al. 2024) generates its questions with a strong model from the chunks themselves;
this is that step for a team with documents and no hand-written question set. For each sampled
chunk (seeded order, ``--chunks``) and each kind in ``synth.kinds`` the teacher is asked once:

- ``factual``: a question a colleague would ask in plain words, answered from the chunk;
- ``abbreviation``: the same, written with the domain's abbreviations as staff type them;
- ``followup``: a first question and a follow-up that only makes sense after it (two records,
  one conversation: turn 1 ``factual``, turn 2 ``followup``);
- ``unanswerable``: a question on the chunk's subject that the chunk does not answer.

The teacher is ``synth.teacher.backend``: ``local`` (ragtune's generation backend, built by
``core.generation.build_backend``: the packaged 135M model by default, a weak teacher) or
``openai`` (any OpenAI-compatible endpoint through LangChain's ChatOpenAI, the reply held to a JSON
schema where the server supports it). Its reply is parsed by LangChain's JsonOutputParser and
checked by a pydantic model per kind.

Filters run before anything is kept; every dropped item is counted by reason (the filter table,
printed at the end and written to ``filters.json``):

- the answer's facts must appear in the chunk: every number (``core.facts.numbers``) and every
  name (a word with a capital letter past the start of a sentence, an abbreviation, a word with
  digits: "Cardivexin", "eGFR", "T2DM");
- the question must retrieve its chunk within ``synth.top_k`` through ``core.retrieval.Retriever``
  (the chat's retriever, with its score threshold; a follow-up searched as the chat searches it,
  ``chat.condense=concat``); one that does not is *hard*: ``synth.hard`` keeps it apart
  (``hard.jsonl``), in ``qa.jsonl`` marked ``"hard": true``, or drops it;
- near-duplicates are dropped: the same words, or an embedding within ``synth.duplicate_similarity``
  (cosine) of a question already kept;
- an unanswerable question must not be answered by the collection: the words it asks about that
  its chunk lacks must exist (else the chunk answers it) and no retrieved chunk may hold them all
  (else another chunk does). A heuristic, and said so: words, not meaning.

Resumable: ``journal.jsonl`` gets one line per (chunk, kind) once its teacher call is done, with
the records it kept and what it dropped, flushed before the records are appended to ``qa.jsonl``;
a re-run of the same command skips what the journal holds and retries what failed. A teacher that
times out, returns non-JSON or an empty answer, or an endpoint that refuses (HTTP 4xx/5xx): the
call is reported on stderr, counted, journalled as failed, and the run goes on. ``qa.jsonl`` and
``hard.jsonl`` are rebuilt from the journal at the start of every run, so a run killed between the
two writes loses nothing and duplicates nothing.

Output (``--out``): ``qa.jsonl`` (core/qa.py records, what ``finetune prepare --qa`` reads:
gold_doc is the chunk's source, gold_page its PDF page), ``hard.jsonl``, ``filters.json``,
``summary.json``, ``journal.jsonl``, ``run.json`` (the options a resume must match).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.facts import numbers
from core.prompts import best_query, followup_queries
from core.qa import QARecord
from core.settings import Settings
from core.store import CONTENT_KEY, METADATA_KEY
from finetune.files import InputError, write_json

if TYPE_CHECKING:
    from core.embeddings import Embedder
    from core.retrieval import Retriever, Source
    from core.store import Store

log = logging.getLogger(__name__)

JOURNAL, QA_FILE, HARD_FILE, FILTERS_FILE, SUMMARY_FILE, RUN_FILE = (
    "journal.jsonl", "qa.jsonl", "hard.jsonl", "filters.json", "summary.json", "run.json")

# Why a teacher call gave nothing usable; each is a row of the filter table.
TEACHER_FAILURES = ("teacher_timeout", "teacher_refused", "teacher_unreachable", "teacher_non_json", "teacher_empty")
# Why a written item was not kept.
DROP_REASONS = (
    "question_too_short", "answer_numbers_not_in_chunk", "answer_names_not_in_chunk", "near_duplicate",
    "hard_dropped", "unanswerable_answered_by_chunk", "unanswerable_answered_elsewhere", "followup_without_turn_1",
)


# -- what the teacher is asked for -------------------------------------------------------------
class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class QuestionAnswer(_Reply):
    question: str = ""
    answer: str = ""


class Conversation(_Reply):
    question: str = ""
    answer: str = ""
    followup: str = ""
    followup_answer: str = ""


class Unanswerable(_Reply):
    question: str = ""


REPLY_MODELS: dict[str, type[_Reply]] = {
    "factual": QuestionAnswer, "abbreviation": QuestionAnswer, "followup": Conversation, "unanswerable": Unanswerable,
}

SYSTEM = ("You write training data for an assistant that answers staff questions from an organisation's "
          "documents. Reply with one JSON object and nothing else.")

INSTRUCTIONS = {
    "factual": ("Write one question a colleague would ask in plain words that this passage answers, and its "
                "answer, using only facts stated in the passage (keep its numbers and names exactly)."),
    "abbreviation": ("Write one short question as staff would type it, using the field's abbreviations "
                     "(for example HTN, eGFR, MI, IV), that this passage answers, and its answer, using only facts "
                     "stated in the passage."),
    "followup": ("Write a first question that this passage answers, and a short follow-up question that only "
                 "makes sense after the first (for example \"And in children?\"), also answered by the passage; "
                 "give both answers, using only facts stated in the passage."),
    "unanswerable": ("Write one question on the same subject that this passage does NOT answer: ask about a "
                     "detail it leaves out. Do not answer it."),
}

def reply_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a reply: every field a required non-empty string."""
    fields = list(REPLY_MODELS[kind].model_fields)
    return {"type": "object", "properties": {f: {"type": "string", "minLength": 1} for f in fields},
            "required": fields, "additionalProperties": False}


def teacher_messages(kind: str, chunk: "Chunk") -> list[dict[str, str]]:
    # No example reply: the 135M model copied one's drug name into its questions (measured), and a
    # schema-held reply (grammar or json_schema) needs none.
    where = chunk.title + (f", {chunk.section}" if chunk.section else "")
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": (
            f"Passage from \"{where}\":\n<<<\n{chunk.text}\n>>>\n\n{INSTRUCTIONS[kind]}\n\n"
            f"Reply as one JSON object with the keys {', '.join(REPLY_MODELS[kind].model_fields)}.")},
    ]


# -- teachers ------------------------------------------------------------------------------------
class TeacherFailure(RuntimeError):
    """A teacher call that gave nothing usable; ``reason`` is its row in the filter table."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class TeacherReply:
    text: str
    tokens: int  # generated tokens, for --max-tokens


class Teacher:
    """What synth asks of a teacher: one reply to one prompt."""

    name: str = "teacher"

    def ask(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> TeacherReply:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalTeacher(Teacher):
    """ragtune's own generation backend (llm.backend), base weights, the teacher's length and temperature."""

    def __init__(self, settings: Settings):
        from core.generation import build_backend

        teacher = settings.synth.teacher
        llm = settings.llm.model_copy(update={"temperature": teacher.temperature, "adapter": None})
        self.backend = build_backend(settings.model_copy(update={"llm": llm}))
        self.max_new_tokens = teacher.max_new_tokens
        self.temperature = teacher.temperature
        self.repeat_penalty = settings.llm.repetition_penalty
        described = self.backend.describe()
        self.name = f"local {described['backend']}: {described['weights']}"

    def ask(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> TeacherReply:
        if self.backend.name == "llamacpp":
            return self._ask_llamacpp(messages, schema)
        # transformers takes no grammar: the schema is only in the prompt, and a small model strays from it.
        message = self.backend.chat_model(False, self.max_new_tokens).invoke(
            [(m["role"], m["content"]) for m in messages])
        text = str(message.content)
        return TeacherReply(text=text, tokens=self.backend.count_tokens(text))

    def _ask_llamacpp(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> TeacherReply:
        # llama.cpp turns the schema into a grammar, so even the 135M model writes the JSON asked for
        # (measured: without it, 10 of 12 of its replies were prose); the backend's chat model has no
        # grammar parameter, so the call goes to its base Llama instance, under that instance's lock.
        instance = self.backend.instance(False)
        with instance.lock:
            reply = instance.llama.create_chat_completion(
                messages=[dict(m) for m in messages], response_format={"type": "json_object", "schema": schema},
                max_tokens=self.max_new_tokens, temperature=self.temperature, seed=0,
                repeat_penalty=self.repeat_penalty,
            )
        text = reply["choices"][0]["message"].get("content") or ""
        return TeacherReply(text=text, tokens=int(reply.get("usage", {}).get("completion_tokens") or 0))

    def close(self) -> None:
        self.backend.close()


class OpenAITeacher(Teacher):
    """Any OpenAI-compatible endpoint through LangChain's ChatOpenAI (retries and timeouts are the
    openai client's: it retries timeouts, 408, 429 and 5xx ``retries`` times)."""

    def __init__(self, settings: Settings, seed: int):
        try:
            from langchain_openai import ChatOpenAI
        except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
            raise ImportError(f"synth.teacher.backend=openai needs langchain-openai: pip install langchain-openai ({exc})") from exc
        teacher = settings.synth.teacher
        self.response_format = teacher.response_format
        self.model = ChatOpenAI(
            base_url=teacher.base_url, api_key=teacher.api_key, model=teacher.model, timeout=teacher.timeout_s,
            max_retries=teacher.retries, max_tokens=teacher.max_new_tokens, temperature=teacher.temperature, seed=seed,
        )
        self.name = f"openai: {teacher.model} at {teacher.base_url}"

    def _format(self, schema: dict[str, Any]) -> dict[str, Any] | None:
        if self.response_format == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "synth_item", "schema": schema, "strict": True}}
        if self.response_format == "json_object":
            return {"type": "json_object", "schema": schema}
        return None

    def ask(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> TeacherReply:
        import openai

        response_format = self._format(schema)
        kwargs = {"response_format": response_format} if response_format else {}
        try:
            message = self.model.invoke([(m["role"], m["content"]) for m in messages], **kwargs)
        except openai.APITimeoutError as exc:
            raise TeacherFailure("teacher_timeout", f"no reply within {self.model.request_timeout} s ({exc})") from exc
        except openai.APIStatusError as exc:
            raise TeacherFailure("teacher_refused", f"HTTP {exc.status_code}: {str(exc)[:200]}") from exc
        except openai.APIConnectionError as exc:
            raise TeacherFailure("teacher_unreachable", str(exc)[:200]) from exc
        usage = getattr(message, "usage_metadata", None) or {}
        text = message.content if isinstance(message.content, str) else json.dumps(message.content)
        return TeacherReply(text=text, tokens=int(usage.get("output_tokens") or max(1, len(text) // 4)))


def build_teacher(settings: Settings, seed: int = 0) -> Teacher:
    """The teacher ``synth.teacher.backend`` names: chosen here and nowhere else."""
    match settings.synth.teacher.backend:
        case "local":
            return LocalTeacher(settings)
        case "openai":
            return OpenAITeacher(settings, seed)
    raise ValueError(f"synth.teacher.backend={settings.synth.teacher.backend!r}: choose local or openai")


def parse_reply(kind: str, reply: TeacherReply) -> _Reply:
    """The teacher's JSON as the kind's model; TeacherFailure (non-JSON or empty) otherwise."""
    from langchain_core.exceptions import OutputParserException
    from langchain_core.output_parsers import JsonOutputParser

    if not reply.text.strip():
        raise TeacherFailure("teacher_empty", "the reply was empty")
    try:
        value = JsonOutputParser().parse(reply.text)
    except OutputParserException:
        raise TeacherFailure("teacher_non_json", f"not JSON: {reply.text[:120]!r}") from None
    if isinstance(value, list) and value and isinstance(value[0], dict):
        value = value[0]  # a list of one object is a common small-model reply
    if not isinstance(value, dict):
        raise TeacherFailure("teacher_non_json", f"a JSON {type(value).__name__}, not an object: {reply.text[:120]!r}")
    try:
        parsed = REPLY_MODELS[kind].model_validate({k: v for k, v in value.items() if isinstance(v, str)})
    except ValidationError as exc:  # pragma: no cover - every field is an optional string
        raise TeacherFailure("teacher_non_json", str(exc)[:200]) from None
    empty = [name for name in REPLY_MODELS[kind].model_fields if not getattr(parsed, name)]
    if empty:
        raise TeacherFailure("teacher_empty", f"no {', '.join(empty)} in {reply.text[:120]!r}")
    return parsed


# -- the collection ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    id: str  # the Qdrant point id
    text: str
    source: str  # metadata.source: what gold_doc records
    title: str
    section: str | None
    page: int | None

    @property
    def short_id(self) -> str:
        return re.sub(r"[^0-9a-zA-Z]", "", self.id)[:12]


def sample_chunks(store: "Store", seed: int, limit: int | None) -> list[Chunk]:
    """Every public chunk of the collection in a seeded order (point ids sorted first: stable across
    runs). Uploads (an owner's scope) are left out: a user's private document is not training data."""
    from core.store import PUBLIC_SCOPE, SCOPE_KEY

    chunks: list[Chunk] = []
    physical = store.physical_name()
    for point in store.scroll(physical) if physical else []:
        payload = point.payload or {}
        meta = payload.get(METADATA_KEY) or {}
        text = str(payload.get(CONTENT_KEY, "")).strip()
        if not text or "source" not in meta or meta.get(SCOPE_KEY, PUBLIC_SCOPE) != PUBLIC_SCOPE:
            continue
        page = meta.get("page")
        chunks.append(Chunk(id=str(point.id), text=text, source=str(meta["source"]),
                            title=str(meta.get("title") or meta["source"]), section=meta.get("section"),
                            page=int(page) if isinstance(page, int) else None))
    chunks.sort(key=lambda c: c.id)
    random.Random(f"{seed}:chunks").shuffle(chunks)
    return chunks[:limit] if limit is not None else chunks


# -- filters -------------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*)$")
_STOPWORDS = frozenset(
    "about above after again against also any because been before being below between both but can could "
    "does doing down during each every from further have having here how into its itself just more most "
    "must need only other over same should some such than that their them then there these they this "
    "those through under until very was were what when where which while who whom why will with would "
    "your yours patient patients used use given take taken".split())


def answer_names(answer: str) -> list[str]:
    """The names an answer states: words with a capital past the start of a sentence, abbreviations
    (two or more capitals), words mixing letters and digits. "I" and sentence-initial words are not names."""
    found: list[str] = []
    for match in _WORD.finditer(answer):
        word = match.group(0)
        if not any(c.isalpha() for c in word) or word == "I":
            continue
        capitals = sum(c.isupper() for c in word)
        mixed = any(c.isdigit() for c in word) and any(c.isalpha() for c in word)
        sentence_start = bool(_SENTENCE_START.search(answer[: match.start()]))
        if mixed or capitals >= 2 or (capitals == 1 and not word[0].isupper()) or (
                word[0].isupper() and not sentence_start):
            if word not in found:
                found.append(word)
    return found


def missing_facts(answer: str, chunk: Chunk) -> tuple[list[str], list[str]]:
    """(numbers, names) the answer states that the chunk (its text and title) does not."""
    evidence = f"{chunk.title}\n{chunk.section or ''}\n{chunk.text}"
    known_numbers = set(numbers(evidence))
    lowered = evidence.casefold()
    return ([n for n in numbers(answer) if n not in known_numbers],
            [w for w in answer_names(answer) if w.casefold() not in lowered])


def content_words(text: str) -> set[str]:
    return {w.casefold() for w in _WORD.findall(text) if len(w) >= 4 and w.casefold() not in _STOPWORDS}


def normalized_question(text: str) -> str:
    return " ".join(_WORD.findall(text.casefold()))


class DuplicateFilter:
    """Questions kept so far, by words and by embedding (the collection's embedder)."""

    def __init__(self, embedder: "Embedder", similarity: float):
        self.embedder = embedder
        self.similarity = similarity
        self.texts: set[str] = set()
        self.vectors: list[list[float]] = []

    def _vector(self, question: str) -> list[float]:
        import numpy as np

        vector = np.asarray(self.embedder.embeddings.embed_query(question), dtype=float)
        return list(vector / (np.linalg.norm(vector) or 1.0))

    def is_duplicate(self, question: str) -> bool:
        import numpy as np

        if normalized_question(question) in self.texts:
            return True
        if not self.vectors:
            return False
        scores = np.asarray(self.vectors) @ np.asarray(self._vector(question))
        return float(scores.max()) >= self.similarity

    def add(self, question: str) -> None:
        self.texts.add(normalized_question(question))
        self.vectors.append(self._vector(question))


def retrieves_chunk(sources: Sequence["Source"], chunk: Chunk) -> bool:
    return any(s.text.strip() == chunk.text and s.source == chunk.source for s in sources)


# -- one unit of work: a chunk and a kind ------------------------------------------------------
@dataclass
class UnitResult:
    kept: list[dict[str, Any]] = field(default_factory=list)  # qa.jsonl records
    hard: list[dict[str, Any]] = field(default_factory=list)  # hard.jsonl records (synth.hard=apart)
    dropped: Counter = field(default_factory=Counter)
    failure: TeacherFailure | None = None
    tokens: int = 0


class Synthesizer:
    """Asks the teacher about chunks and filters what it writes (the parts are passed in)."""

    def __init__(self, settings: Settings, teacher: Teacher, retriever: "Retriever", duplicates: DuplicateFilter):
        self.settings = settings
        self.synth = settings.synth
        self.teacher = teacher
        self.retriever = retriever
        self.duplicates = duplicates

    def search(self, question: str, history: list[tuple[str, str]]) -> list["Source"]:
        """What the chat would retrieve for this question (a follow-up searched as chat.condense=concat does)."""
        queries = followup_queries(question, history, self.settings.chat.condense_turns)
        from core.store import PUBLIC_SCOPE

        found = {q: self.retriever.retrieve(q, scopes=[PUBLIC_SCOPE]) for q in queries}
        chosen = best_query(queries, lambda q: found[q][0].score if found[q] else None)
        return found[chosen]

    def run_unit(self, chunk: Chunk, kind: str) -> UnitResult:
        result = UnitResult()
        try:
            reply = self.teacher.ask(teacher_messages(kind, chunk), reply_schema(kind))
            result.tokens = reply.tokens
            parsed = parse_reply(kind, reply)
        except TeacherFailure as failure:
            result.failure = failure
            return result
        base = {"gold_doc": chunk.source, "chunk_id": chunk.id, "teacher": self.teacher.name}
        if chunk.page is not None:
            base["gold_page"] = chunk.page
        if kind == "unanswerable":
            assert isinstance(parsed, Unanswerable)
            self._unanswerable(chunk, parsed.question, result)
        elif kind == "followup":
            assert isinstance(parsed, Conversation)
            conversation = f"synth-{chunk.short_id}-conv"
            first = self._answerable(chunk, parsed.question, parsed.answer, [], result,
                                     base | {"id": f"synth-{chunk.short_id}-followup-1", "type": "factual",
                                             "conversation_id": conversation, "turn": 1})
            if first is None:
                result.dropped["followup_without_turn_1"] += 1
            else:
                self._answerable(chunk, parsed.followup, parsed.followup_answer, [(parsed.question, parsed.answer)],
                                 result, base | {"id": f"synth-{chunk.short_id}-followup-2", "type": "followup",
                                                 "conversation_id": conversation, "turn": 2})
        else:
            assert isinstance(parsed, QuestionAnswer)
            self._answerable(chunk, parsed.question, parsed.answer, [], result,
                             base | {"id": f"synth-{chunk.short_id}-{kind}", "type": kind})
        return result

    def _answerable(self, chunk: Chunk, question: str, answer: str, history: list[tuple[str, str]],
                    result: UnitResult, fields: dict[str, Any]) -> dict[str, Any] | None:
        if len(question) < self.synth.min_question_chars and not history:
            result.dropped["question_too_short"] += 1
            return None
        wrong_numbers, wrong_names = missing_facts(answer, chunk)
        if wrong_numbers:
            result.dropped["answer_numbers_not_in_chunk"] += 1
            return None
        if wrong_names:
            result.dropped["answer_names_not_in_chunk"] += 1
            return None
        # A follow-up is compared with its first turn in front: "And in children?" may recur.
        key = " ".join([q for q, _ in history] + [question])
        if self.duplicates.is_duplicate(key):
            result.dropped["near_duplicate"] += 1
            return None
        record = fields | {"question": question, "answer": answer}
        if not retrieves_chunk(self.search(question, history), chunk):
            if self.synth.hard == "drop":
                result.dropped["hard_dropped"] += 1
                return None
            record["hard"] = True
        validate_record(record)
        self.duplicates.add(key)
        (result.hard if record.get("hard") and self.synth.hard == "apart" else result.kept).append(record)
        return record

    def _unanswerable(self, chunk: Chunk, question: str, result: UnitResult) -> None:
        if len(question) < self.synth.min_question_chars:
            result.dropped["question_too_short"] += 1
            return
        # What the question asks about that its chunk does not mention; if nothing, the chunk answers it.
        novel = content_words(question) - content_words(f"{chunk.title} {chunk.section or ''} {chunk.text}")
        if not novel:
            result.dropped["unanswerable_answered_by_chunk"] += 1
            return
        if any(novel <= content_words(s.text) for s in self.search(question, [])):
            result.dropped["unanswerable_answered_elsewhere"] += 1
            return
        if self.duplicates.is_duplicate(question):
            result.dropped["near_duplicate"] += 1
            return
        record = {"id": f"synth-{chunk.short_id}-unanswerable", "type": "unanswerable", "question": question,
                  "answer": "", "chunk_id": chunk.id, "teacher": self.teacher.name}
        validate_record(record)
        self.duplicates.add(question)
        result.kept.append(record)


def validate_record(record: dict[str, Any]) -> None:
    """Every written record is one core/qa.py accepts (a bug here must not become a bad file)."""
    QARecord.model_validate({k: v for k, v in record.items() if k not in ("chunk_id", "teacher", "hard")})


# -- the run: journal, budget, output ----------------------------------------------------------
class SynthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunks: int | None = Field(None, ge=1, description="chunks to sample (default: all, in seeded order)")
    seed: int = 0
    max_questions: int | None = Field(None, ge=1, description="stop once this many records are kept (qa + hard)")
    max_tokens: int | None = Field(None, ge=1, description="stop once the teacher has generated this many tokens")


@dataclass
class SynthResult:
    out: Path
    summary: dict[str, Any]
    failures: list[str]  # this run's failed teacher calls, "chunk kind: reason: detail"


def _journal_entries(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            # Only a run killed mid-write leaves a torn last line; that unit is simply redone.
            log.warning("%s:%d: torn journal line ignored (that unit is asked again)", path, number)


def _append(handle: Any, row: dict[str, Any]) -> None:
    handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    staging.replace(path)


def _check_run(out: Path, run: dict[str, Any]) -> None:
    """A resume must ask the same collection with the same seed and kinds, or the journal lies."""
    path = out / RUN_FILE
    if not path.is_file():
        write_json(path, run)
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    differ = [k for k in ("collection", "seed", "kinds", "teacher") if before.get(k) != run.get(k)]
    if differ:
        raise InputError(
            f"{out} holds a synth run with other {', '.join(differ)} ({path}: "
            f"{ {k: before.get(k) for k in differ} }); give another --out, or delete it to start over")


def synthesize(
    settings: Settings,
    out: Path,
    options: SynthOptions,
    *,
    store: "Store | None" = None,
    embedder: "Embedder | None" = None,
    teacher: Teacher | None = None,
    progress: bool = False,
) -> SynthResult:
    """Sample chunks, ask the teacher, filter, and write; resumes from ``out/journal.jsonl``."""
    from tqdm import tqdm

    from core.retrieval import Retriever

    owns = {"store": store is None, "teacher": teacher is None}
    if embedder is None:
        from core.embeddings import load_embedder

        embedder = load_embedder(settings.embedding)
    if store is None:
        from core.store import open_store

        store = open_store(settings)
    try:
        if not store.exists() or store.count() == 0:
            raise InputError(f"Qdrant collection {settings.qdrant.collection!r} is empty or missing; index the "
                             f"documents first, e.g. python -m ingest data/demo")
        store.check_embedder(embedder.info)
        out.mkdir(parents=True, exist_ok=True)
        _check_run(out, {"collection": settings.qdrant.collection, "seed": options.seed, "kinds": settings.synth.kinds,
                         "teacher": settings.synth.teacher.backend})

        # What earlier runs did: done units are skipped, failed ones asked again.
        entries = list(_journal_entries(out / JOURNAL))
        done = {(e["chunk_id"], e["kind"]): e for e in entries if e.get("status") == "done"}
        before = dict(done)
        kept = [r for e in done.values() for r in e["kept"]]
        hard = [r for e in done.values() for r in e["hard"]]
        _rewrite(out / QA_FILE, kept)  # the journal is the truth: a torn append is healed here
        _rewrite(out / HARD_FILE, hard)

        # The chat's retriever (method, threshold), public chunks only, the top k the filter asks for.
        retriever = Retriever(store, embedder, settings).with_settings(k=settings.synth.top_k)
        duplicates = DuplicateFilter(embedder, settings.synth.duplicate_similarity)
        for record in kept + hard:
            duplicates.add(record["question"] if record.get("turn") != 2 else " ".join(
                [_first_turn(record, kept + hard), record["question"]]))
        chunks = sample_chunks(store, options.seed, options.chunks)
        units = [(c, k) for c in chunks for k in settings.synth.kinds]
        if teacher is None and any((c.id, k) not in done for c, k in units):
            teacher = build_teacher(settings, options.seed)  # not loaded when nothing is left to ask
        synthesizer = Synthesizer(settings, teacher or Teacher(), retriever, duplicates)
        tokens = sum(int(e.get("tokens", 0)) for e in entries)
        this_run: Counter = Counter()
        failures: list[str] = []
        stopped = None
        started = time.monotonic()
        with (out / JOURNAL).open("a", encoding="utf-8") as journal, \
                (out / QA_FILE).open("a", encoding="utf-8") as qa_out, \
                (out / HARD_FILE).open("a", encoding="utf-8") as hard_out:
            bar = tqdm(units, desc="synth", unit="call", disable=not progress)
            for chunk, kind in bar:
                if (chunk.id, kind) in done:
                    continue
                if options.max_questions is not None and len(kept) + len(hard) >= options.max_questions:
                    stopped = f"--max-questions {options.max_questions}"
                    break
                if options.max_tokens is not None and tokens >= options.max_tokens:
                    stopped = f"--max-tokens {options.max_tokens}"
                    break
                result = synthesizer.run_unit(chunk, kind)
                tokens += result.tokens
                entry = {"chunk_id": chunk.id, "kind": kind, "source": chunk.source, "tokens": result.tokens,
                         "status": "failed" if result.failure else "done", "kept": result.kept, "hard": result.hard,
                         "dropped": dict(result.dropped)}
                if result.failure is not None:
                    entry["failure"] = {"reason": result.failure.reason, "detail": result.failure.detail}
                    this_run[result.failure.reason] += 1
                    failures.append(f"{chunk.source} ({chunk.id}) {kind}: {result.failure}")
                    log.warning("teacher call failed, counted and journalled; the run goes on: %s", failures[-1])
                _append(journal, entry)  # first the journal, then the files it rebuilds
                for record in result.kept:
                    _append(qa_out, record)
                for record in result.hard:
                    _append(hard_out, record)
                kept += result.kept
                hard += result.hard
                if result.failure is None:
                    done[(chunk.id, kind)] = entry
                this_run.update(result.dropped)
                this_run["kept"] += len(result.kept)
                this_run["hard"] += len(result.hard) + sum(bool(r.get("hard")) for r in result.kept)
                bar.set_postfix(kept=len(kept), hard=len(hard), failed=len(failures))
    finally:
        if owns["store"]:
            store.close()
        if owns["teacher"] and teacher is not None:
            teacher.close()

    entries = list(_journal_entries(out / JOURNAL))
    table = filter_table(entries, this_run)
    summary = {
        "records": {"qa": len(kept), "hard": len(hard), "by_type": dict(sorted(Counter(r["type"] for r in kept).items()))},
        "filters": table,
        "chunks": {"sampled": len(chunks), "units_done": len(done), "units_before_this_run": len(before),
                   "units_failed_now": len({(e["chunk_id"], e["kind"]) for e in entries if e["status"] == "failed"}
                                           - set(done))},
        "teacher": {"name": teacher.name if teacher else "none needed (nothing left to ask)", "tokens": tokens},
        "stopped_by": stopped, "wall_s": round(time.monotonic() - started, 1),
        "options": options.model_dump(), "settings": settings.synth.model_dump(exclude={"teacher": {"api_key"}}),
        "collection": settings.qdrant.collection,
    }
    write_json(out / FILTERS_FILE, table)
    write_json(out / SUMMARY_FILE, summary)
    return SynthResult(out=out, summary=summary, failures=failures)


def _first_turn(record: dict[str, Any], records: list[dict[str, Any]]) -> str:
    return next((r["question"] for r in records
                 if r.get("conversation_id") == record.get("conversation_id") and r.get("turn") == 1), "")


def filter_table(entries: list[dict[str, Any]], this_run: Counter) -> dict[str, dict[str, int]]:
    """Per reason: items counted over the whole journal (a failed call retried later counts once
    per try: each try was a call) and in this run."""
    total: Counter = Counter()
    for entry in entries:
        if entry.get("failure"):
            total[entry["failure"]["reason"]] += 1
        total.update(entry.get("dropped", {}))
        if entry.get("status") == "done":
            total["kept"] += len(entry["kept"])
            total["hard"] += len(entry["hard"]) + sum(bool(r.get("hard")) for r in entry["kept"])
    rows = ("kept", "hard", *DROP_REASONS, *TEACHER_FAILURES)
    return {reason: {"all_runs": total[reason], "this_run": this_run[reason]} for reason in rows
            if total[reason] or this_run[reason] or reason in ("kept", "hard")}


def format_table(summary: dict[str, Any]) -> str:
    """The filter table and the counts a person reads after synth."""
    lines = [f"{'outcome':34} {'all runs':>8} {'this run':>8}"]
    for reason, counts in summary["filters"].items():
        lines.append(f"{reason:34} {counts['all_runs']:8} {counts['this_run']:8}")
    records = summary["records"]
    by_type = ", ".join(f"{t} {n}" for t, n in records["by_type"].items())
    lines.append(f"qa.jsonl: {records['qa']} records ({by_type}); hard.jsonl: {records['hard']}; "
                 f"teacher tokens {summary['teacher']['tokens']}; {summary['wall_s']} s this run")
    if summary["stopped_by"]:
        lines.append(f"stopped by {summary['stopped_by']}")
    return "\n".join(lines)
