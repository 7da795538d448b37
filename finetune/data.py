"""python -m finetune prepare: Q/A records + the Qdrant index -> chat-format training files.

Two kinds of example are written from the same train/validation split:

- ``sft/``: question -> answer, with the prompt the chat chain uses when it retrieves nothing.
- ``raft/``: RAFT-style (Zhang et al. 2024, "RAFT: Adapting Language Model to Domain Specific
  RAG"). The question comes with its gold chunk and ``k`` distractor chunks, shuffled and
  numbered exactly as the chat chain numbers retrieved chunks; the target cites the gold chunk
  as ``[n]``. In a share ``P`` of the answerable examples the gold chunk is left out (``k + 1``
  distractors instead, so the count gives nothing away) and the target is NOT_COVERED: the
  model learns to say so rather than to answer from a near miss. Unanswerable records get
  ``k + 1`` retrieved chunks and NOT_COVERED as well.

Every prompt is built by ``core.prompts.build_messages``, the function the chat chain calls, so
training and serving cannot drift apart. Each line is TRL's conversational prompt-completion
format, ``{"prompt": [system, user], "completion": [assistant]}`` plus bookkeeping fields
(``id``, ``case``, ``gold``, ``sources``) that training ignores.

Gold chunk: the gold document's chunk the chat's retriever ranks first for the question (filtered
to that document, and to ``gold_page`` when the record names one); with ``--gold-chunks N`` its
next N - 1 chunks are shown too (uncited), for answers that need the whole document. Distractors: what the chat's
retriever ranks highest for the question among other documents (same method, vector and MMR). ``k`` defaults to ``retrieval.k - 1``, so an example shows as
many chunks as the chat chain retrieves. A follow-up turn keeps its earlier turns as chat history
and is searched as the chain searches it (``chat.condense=concat``: the question alone or with
earlier questions in front, whichever finds the closer chunk). Everything random (split, shuffles, which examples lose their
gold chunk) comes from the seed and the record id, so the same inputs give the same bytes.

Output (written to a staging folder, renamed into place when complete):

    OUT/sft/train.jsonl  OUT/sft/validation.jsonl
    OUT/raft/train.jsonl OUT/raft/validation.jsonl
    OUT/summary.json     counts, shares, gold positions, token lengths (chat template included)
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.embeddings import Embedder
from core.evidence import EvidenceSelector, EvidenceUnit, words
from core.facts import numbers
from core.prompts import NOT_COVERED, ContextChunk, best_query, build_messages, followup_queries, narrow_chunks
from core.quotes import quote_target
from core.qa import QARecord, check_disjoint, load_qa
from core.settings import Settings
from core.retrieval import Retriever, chunk_of
from core.store import METADATA_KEY, PUBLIC_SCOPE, SCOPE_KEY, Hit, SearchFilter
from finetune.files import (
    InputError, raise_problems, refuse_existing, sha256_file, staged_dir, write_json, write_jsonl,
)
from finetune.tokens import chat_token_count, length_stats

if TYPE_CHECKING:
    from core.store import Store
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Kind = Literal["sft", "raft"]
SPLITS = ("train", "validation")


class PrepareOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kinds: list[Kind] = Field(default_factory=lambda: ["sft", "raft"], min_length=1)
    distractors: int | None = Field(
        None, ge=0, le=49, description="k: distractor chunks beside the gold one; default retrieval.k - 1"
    )
    no_gold_share: float = Field(0.2, ge=0.0, le=1.0, description="P: share of answerable RAFT examples without gold")
    val_share: float = Field(0.1, gt=0.0, le=0.5, description="validation share when no --val-qa is given")
    seed: int = 0
    followups: Literal["with-history", "skip"] = Field(
        "with-history", description="follow-up turns: keep them (earlier turns as chat history) or leave them out"
    )
    max_tokens: int | None = Field(None, ge=32, description="longest example allowed; default llm.context_window")
    raft_unanswerable: bool = Field(
        True, description="RAFT examples for unanswerable records (target NOT_COVERED); false when the chat's "
        "calibrated decline (retrieval.decline) decides 'not covered' and the adapter should always answer"
    )
    quotes: bool = Field(True, description="RAFT prompts show the evidence units and targets quote them first")
    gold_chunks: int = Field(
        1, ge=1, le=10, description="chunks of the gold document a RAFT example shows (its best-ranked ones): "
        "more than 1 where the answer needs the whole document, e.g. a PubMedQA label read from the abstract's "
        "results, while the best-ranked chunk is the background that restates the question"
    )


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk: the document it belongs to, and the chunk as the prompt shows it."""

    doc_id: str
    chunk: ContextChunk


# -- finding gold documents and retrieving chunks --------------------------------------------
class Passages:
    """The collection seen through the chat's own ``Retriever`` (same method, named vector and
    MMR; the score threshold where the chat applies it, for choosing a follow-up's query), plus the lookup of a record's gold document. Only the shared knowledge base
    (scope ``public``) is read: users' uploads never become training data."""

    def __init__(self, retriever: Retriever):
        self.retriever = retriever
        store = retriever.store
        self.collection = store.name
        if not store.exists():
            raise InputError(
                f"collection {store.name!r} does not exist; index the documents first, "
                f"e.g. python -m ingest data/demo --collection {store.name}"
            )
        store.check_embedder(retriever.embedder.info)
        self._doc_by_source: dict[str, set[str]] = defaultdict(set)
        self._doc_by_record: dict[str, set[str]] = defaultdict(set)
        physical = store.physical_name()
        assert physical is not None
        for point in store.scroll(physical, fields=["doc_id", "source", "record_id", SCOPE_KEY]):
            meta = point.payload.get(METADATA_KEY, {})
            if "doc_id" not in meta or meta.get(SCOPE_KEY, PUBLIC_SCOPE) != PUBLIC_SCOPE:
                continue
            self._doc_by_source[str(meta.get("source", ""))].add(meta["doc_id"])
            if meta.get("record_id") is not None:
                self._doc_by_record[str(meta["record_id"])].add(meta["doc_id"])

    def gold_document(self, record: QARecord) -> str:
        """The doc_id of the record's gold document; InputError naming the record otherwise."""
        if record.gold is None:
            raise InputError(f"{record.where}: no gold document: its chunk can only be found with 'gold_doc' "
                             "(or type the record 'unanswerable')")
        if record.gold_record_id is not None:
            found = self._doc_by_record.get(record.gold_record_id, set())
            what = f"gold {record.gold!r}: no indexed JSONL record with metadata.record_id {record.gold_record_id!r}"
        else:
            wanted = record.gold.lstrip("./")
            found = {d for source, docs in self._doc_by_source.items()
                     if source == wanted or source.endswith("/" + wanted) for d in docs}
            what = f"gold_doc {record.gold_doc!r}: no indexed document whose source ends with '/{wanted}'"
        if not found:
            raise InputError(f"{record.where}: {what} in collection {self.collection!r}")
        if len(found) > 1:
            raise InputError(
                f"{record.where}: the gold document is ambiguous in collection {self.collection!r}: "
                f"{', '.join(sorted(found))}"
            )
        return next(iter(found))

    def embed(self, questions: Sequence[str]) -> list[list[float]]:
        return self.retriever.embed(questions)

    def best_in_document(self, query: str, vector: list[float], doc_id: str, page: int | None) -> Passage | None:
        """The gold chunk: the document's chunk the retriever ranks first (no score threshold:
        the record says it is the answer's source)."""
        hits = self.top_in_document(query, vector, doc_id, page, 1)
        return hits[0] if hits else None

    def top_in_document(self, query: str, vector: list[float], doc_id: str, page: int | None,
                        limit: int) -> list[Passage]:
        """The document's ``limit`` chunks the retriever ranks first, best first."""
        where = SearchFilter(scopes=[PUBLIC_SCOPE], doc_id=doc_id, page=page)
        return self._passages(self.retriever.hits(query, vector, where=where, k=limit, threshold=False))

    def top_score(self, query: str, vector: list[float]) -> float | None:
        """The score of the chunk the chat would show first (None when none passes the threshold)."""
        hits = self.retriever.hits(query, vector, where=SearchFilter(scopes=[PUBLIC_SCOPE]), k=1)
        return hits[0].score if hits else None

    def top_outside(self, query: str, vector: list[float], exclude_doc_id: str | None, limit: int) -> list[Passage]:
        """Distractors: what the chat's retriever ranks highest for the question, other documents
        only. Without the score threshold: an example shows k + 1 chunks whether or not the gold
        one is among them, so that the count gives nothing away."""
        if limit <= 0:
            return []
        where = SearchFilter(scopes=[PUBLIC_SCOPE], not_doc_id=exclude_doc_id)
        return self._passages(self.retriever.hits(query, vector, where=where, k=limit, threshold=False))

    @staticmethod
    def _passages(hits: list[Hit]) -> list[Passage]:
        return [Passage(doc_id=str(h.payload[METADATA_KEY]["doc_id"]), chunk=chunk_of(h)) for h in hits]


# -- splitting and assembling ----------------------------------------------------------------
def split_records(records: list[QARecord], val_share: float, seed: int) -> tuple[list[QARecord], list[QARecord]]:
    """A seeded split that keeps each conversation on one side (no follow-up leaks its context)."""
    groups: dict[str, list[QARecord]] = defaultdict(list)
    for record in records:
        groups[record.conversation_id or f"record:{record.id}"].append(record)
    keys = sorted(groups)
    random.Random(f"{seed}:split").shuffle(keys)
    wanted = max(1, round(val_share * len(records)))
    chosen: set[str] = set()
    taken = 0
    for key in keys:
        if taken >= wanted:
            break
        chosen.add(key)
        taken += len(groups[key])
    if taken >= len(records):
        raise InputError(
            f"{records[0].where.rsplit(':', 1)[0]}: {len(records)} records cannot be split into a training and a "
            "validation part; add records or give --val-qa"
        )
    train = [r for r in records if (r.conversation_id or f"record:{r.id}") not in chosen]
    validation = [r for r in records if (r.conversation_id or f"record:{r.id}") in chosen]
    return train, validation


def conversation_history(record: QARecord, everything: list[QARecord]) -> list[tuple[str, str]]:
    """Earlier turns of the record's conversation, as the chat chain keeps them: text only."""
    if not record.followup or record.conversation_id is None or record.turn is None:
        return []
    earlier = sorted(
        (r for r in everything
         if r.conversation_id == record.conversation_id and r.turn is not None and r.turn < record.turn),
        key=lambda r: r.turn or 0,
    )
    return [(r.question, target_without_documents(r)) for r in earlier]


def embedded_queries(
    records: Sequence[QARecord], histories: Sequence[list[tuple[str, str]]], passages: Passages, turns: int,
) -> list[tuple[str, list[float]]]:
    """What the chat chain searches with for each record (chat.condense='concat', with
    chat.condense_turns = ``turns``), chosen by the same rule: the candidate query whose closest
    chunk scores highest; with its vector. Every distinct text is embedded once."""
    candidates = [followup_queries(r.question, h, turns) for r, h in zip(records, histories)]
    texts = sorted({query for queries in candidates for query in queries})
    vectors = dict(zip(texts, passages.embed(texts))) if texts else {}
    chosen = [
        queries[0] if len(queries) == 1 else best_query(queries, lambda q: passages.top_score(q, vectors[q]))
        for queries in candidates
    ]
    return [(query, vectors[query]) for query in chosen]


def retrieval_queries(
    records: Sequence[QARecord], histories: Sequence[list[tuple[str, str]]], passages: Passages, turns: int,
) -> list[str]:
    """The queries of :func:`embedded_queries`, without their vectors."""
    return [query for query, _ in embedded_queries(records, histories, passages, turns)]


def target_without_documents(record: QARecord) -> str:
    return NOT_COVERED if record.unanswerable else record.answer_text()


def with_citation(answer: str, number: int) -> str:
    return f"{answer} [{number}]"


def sft_example(record: QARecord, history: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "id": record.id,
        "case": "unanswerable" if record.unanswerable else "answer",
        "prompt": build_messages(record.question, None, history),
        "completion": [{"role": "assistant", "content": target_without_documents(record)}],
    }


def answer_quotes(answer: str, units: Sequence[EvidenceUnit], limit: int = 2) -> list[EvidenceUnit]:
    """The shown units a reference answer rests on, for the target's quotes: the one that states
    most of the answer's numbers and words, then a second only if it adds a number the first lacks.
    Chosen among what the model is shown (the evidence selector's units), so the adapter learns to
    copy from its prompt, exactly as it must when serving."""
    wanted_numbers = set(numbers(answer))
    wanted_words = set(words(answer))

    def overlap(unit: EvidenceUnit) -> tuple[int, float]:
        text = unit.for_prompt()
        return (len(wanted_numbers & set(numbers(text))),
                len(wanted_words & set(words(text))) / max(len(wanted_words), 1))

    ranked = sorted(units, key=overlap, reverse=True)
    # A unit sharing no number and under a quarter of the answer's words does not state it.
    if not ranked or (overlap(ranked[0])[0] == 0 and overlap(ranked[0])[1] < 0.25):
        return []
    chosen = [ranked[0]]
    missing = wanted_numbers - set(numbers(ranked[0].for_prompt()))
    for unit in ranked[1:limit + 5]:
        if len(chosen) >= limit or not missing:
            break
        adds = missing & set(numbers(unit.for_prompt()))
        if adds:
            chosen.append(unit)
            missing -= adds
    return chosen


def raft_example(
    record: QARecord,
    history: list[tuple[str, str]],
    gold: Passage | None,
    distractors: list[Passage],
    seed: int,
    selector: EvidenceSelector | None = None,
    prompt_units: int = 4,
) -> dict[str, Any]:
    """Shuffle gold + distractors (seeded by the record id), number them, and cite the gold one.

    With a ``selector`` (the chat's EvidenceSelector), the prompt shows only the selected units under their chunk numbers, as the chain
    does, and the target quotes the unit(s) that state the answer before the answer itself
    (RAFT's chain-of-thought with quotes; core/quotes.py reads the format back)."""
    passages = ([gold] if gold is not None else []) + list(distractors)
    random.Random(f"{seed}:order:{record.id}").shuffle(passages)
    chunks = [p.chunk for p in passages]
    quotes: list[EvidenceUnit] = []
    if selector is not None:
        # Ranked by the question as asked, as the chain ranks them (retrieval used ``query``).
        units = selector.rank(record.question, [(n, c.text) for n, c in enumerate(chunks, start=1)])
        shown = units[:prompt_units]
        if gold is not None:
            # The gold chunk's unit that states the answer is always shown (in place of the weakest
            # shown unit): a target whose facts are not in its prompt would teach the adapter to invent.
            gold_n = passages.index(gold) + 1
            stating = answer_quotes(record.answer_text(), [u for u in units if u.n == gold_n], limit=1)
            if stating and stating[0] not in shown:
                shown = shown[: prompt_units - 1] + stating
            quotes = answer_quotes(record.answer_text(), shown)
        chunks = narrow_chunks(chunks, shown)
    if gold is not None:
        number = passages.index(gold) + 1
        answer = with_citation(record.answer_text(), quotes[0].n if quotes else number)
        target = quote_target([(u.n, u.text) for u in quotes], answer)
        case = "gold"
    else:
        number, target = None, NOT_COVERED
        case = "unanswerable" if record.unanswerable else "no_gold"
    return {
        "id": record.id,
        "case": case,
        "gold": number,
        "quotes": len(quotes),
        "sources": [p.chunk.source for p in passages],
        "prompt": build_messages(record.question, chunks, history),
        "completion": [{"role": "assistant", "content": target}],
    }


def choose_no_gold(records: list[QARecord], share: float, seed: int, split: str) -> set[str]:
    """Exactly round(share * answerable) record ids lose their gold chunk: the share is the config."""
    answerable = [r.id for r in records if not r.unanswerable]
    count = round(share * len(answerable))
    return set(random.Random(f"{seed}:no-gold:{split}").sample(answerable, count))


def build_raft_examples(
    records: list[QARecord],
    everything: list[QARecord],
    passages: Passages,
    options: PrepareOptions,
    split: str,
    distractors: int,
    condense_turns: int,
    progress: bool = False,
    selector: EvidenceSelector | None = None,
    prompt_units: int = 4,
) -> list[dict[str, Any]]:
    """RAFT examples; a follow-up is searched like the chat searches it (chat.condense_turns)."""
    from tqdm import tqdm

    no_gold = choose_no_gold(records, options.no_gold_share, options.seed, split)
    histories = [conversation_history(r, everything) for r in records]
    queries = embedded_queries(records, histories, passages, condense_turns)
    examples: list[dict[str, Any]] = []
    problems: list[str] = []
    k = distractors

    def example(record: QARecord, history: list[tuple[str, str]], gold: Passage | None,
                others: list[Passage]) -> dict[str, Any]:
        return raft_example(record, history, gold, others, options.seed, selector if options.quotes else None,
                            prompt_units)

    for record, history, (query, vector) in tqdm(
        list(zip(records, histories, queries)), desc=f"raft {split}", disable=not progress
    ):
        if record.unanswerable:
            if options.raft_unanswerable:
                examples.append(example(record, history, None, passages.top_outside(query, vector, None, k + 1)))
            continue
        try:
            doc_id = passages.gold_document(record)
        except InputError as exc:
            problems.append(str(exc))
            continue
        if record.id in no_gold:
            examples.append(example(record, history, None, passages.top_outside(query, vector, doc_id, k + 1)))
            continue
        golds = passages.top_in_document(query, vector, doc_id, record.gold_page, options.gold_chunks)
        if not golds:
            problems.append(f"{record.where}: gold_page {record.gold_page} has no indexed chunk in {doc_id}")
            continue
        # The best-ranked gold chunk is the one cited; the document's further chunks are shown
        # (shuffled in with the distractors) but are not counted as distractors.
        examples.append(example(record, history, golds[0], golds[1:] + passages.top_outside(query, vector, doc_id, k)))
    raise_problems(problems, "gold documents not found")
    return examples


# -- the command ------------------------------------------------------------------------------
@dataclass
class PrepareResult:
    out: Path
    summary: dict[str, Any]


def prepare(
    settings: Settings,
    qa_path: Path,
    out: Path,
    options: PrepareOptions,
    *,
    store: "Store | None" = None,
    embedder: Embedder | None = None,
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    val_qa_path: Path | None = None,
    force: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """Read, split, build both kinds, check lengths, then write everything in one rename."""
    refuse_existing(out, force)
    records = load_qa(qa_path)
    if val_qa_path is not None:
        validation = load_qa(val_qa_path)
        check_disjoint(records, validation)
        train = records
    else:
        train, validation = split_records(records, options.val_share, options.seed)
    everything = train + validation
    if options.followups == "skip":
        train = [r for r in train if not r.followup]
        validation = [r for r in validation if not r.followup]
    splits = {"train": train, "validation": validation}
    for name, part in splits.items():
        if not part:
            raise InputError(f"the {name} split is empty (after --followups {options.followups})")

    if tokenizer is None:
        from core.llm import load_chat_model

        tokenizer = load_chat_model(settings, tokenizer_only=True).tokenizer
    examples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    if "sft" in options.kinds:
        examples["sft"] = {
            name: [sft_example(r, conversation_history(r, everything)) for r in part] for name, part in splits.items()
        }
    embedder_name = None
    distractors = options.distractors if options.distractors is not None else settings.retrieval.k - 1
    if "raft" in options.kinds:
        owns_store = store is None
        if embedder is None:
            from core.embeddings import load_embedder

            embedder = load_embedder(settings.embedding)
        if store is None:
            from core.store import open_store

            store = open_store(settings)
        try:
            passages = Passages(Retriever(store, embedder, settings))
            # The chat's evidence selection, so the adapter reads what the chain will show it.
            selector = EvidenceSelector(embedder.embeddings, settings.retrieval.evidence)
            examples["raft"] = {
                name: build_raft_examples(
                    part, everything, passages, options, name, distractors, settings.chat.condense_turns, progress,
                    selector, settings.retrieval.evidence.prompt_units,
                )
                for name, part in splits.items()
            }
        finally:
            if owns_store:
                store.close()
        embedder_name = embedder.info.name

    limit = options.max_tokens or settings.llm.context_window
    summary = summarise(examples, splits, tokenizer, limit)
    summary["inputs"] = {
        "qa": {"path": str(qa_path), "sha256": sha256_file(Path(qa_path))},
        **({"val_qa": {"path": str(val_qa_path), "sha256": sha256_file(Path(val_qa_path))}} if val_qa_path else {}),
    }
    summary["options"] = options.model_dump() | {"max_tokens": limit, "distractors": distractors}
    summary["chat_model"] = settings.llm.model
    if embedder_name is not None:
        summary["collection"] = settings.qdrant.collection
        summary["embedder"] = embedder_name

    with staged_dir(out, force) as staging:
        for kind, by_split in examples.items():
            (staging / kind).mkdir()
            for name, rows in by_split.items():
                write_jsonl(staging / kind / f"{name}.jsonl", rows)
        write_json(staging / "summary.json", summary)
    return PrepareResult(out=out, summary=summary)


def summarise(
    examples: dict[str, dict[str, list[dict[str, Any]]]],
    splits: dict[str, list[QARecord]],
    tokenizer: "PreTrainedTokenizerBase",
    limit: int,
) -> dict[str, Any]:
    """Counts, shares and token lengths; an example over ``limit`` tokens stops everything."""
    where = {r.id: r.where for part in splits.values() for r in part}
    problems: list[str] = []
    summary: dict[str, Any] = {
        "records": {name: len(part) for name, part in splits.items()},
        "followups": {name: sum(r.followup for r in part) for name, part in splits.items()},
    }
    for kind, by_split in examples.items():
        summary[kind] = {}
        for name, rows in by_split.items():
            lengths = []
            for row in rows:
                length = chat_token_count(tokenizer, row["prompt"] + row["completion"])
                lengths.append(length)
                if length > limit:
                    problems.append(
                        f"{where[row['id']]}: the {kind} example is {length} tokens, over the limit of {limit} "
                        "(raise --max-tokens, or use fewer --distractors)"
                    )
            cases = Counter(row["case"] for row in rows)
            entry: dict[str, Any] = {"examples": len(rows), "cases": dict(sorted(cases.items())),
                                     "tokens": length_stats(lengths)}
            if kind == "raft":
                answerable = cases["gold"] + cases["no_gold"]
                entry["no_gold_share"] = round(cases["no_gold"] / answerable, 4) if answerable else 0.0
                entry["gold_position"] = dict(sorted(Counter(str(row["gold"]) for row in rows if row["gold"]).items()))
            summary[kind][name] = entry
    raise_problems(problems, "examples longer than the limit")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines a person reads after prepare."""
    lines = [f"records: train {summary['records']['train']}, validation {summary['records']['validation']}"]
    for kind in ("sft", "raft"):
        for name in SPLITS:
            entry = summary.get(kind, {}).get(name)
            if not entry:
                continue
            tokens = entry["tokens"]
            cases = ", ".join(f"{c} {n}" for c, n in entry["cases"].items())
            line = (f"{kind:4} {name:10} {entry['examples']:5} examples ({cases}); tokens "
                    f"mean {tokens.get('mean', 0)}, p95 {tokens.get('p95', 0)}, max {tokens.get('max', 0)}")
            if kind == "raft":
                line += f"; gold at {entry['gold_position']}"
            lines.append(line)
    return "\n".join(lines)
