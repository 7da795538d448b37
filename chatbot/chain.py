"""The conversational chain: condense -> retrieve -> prompt -> stream -> cite -> remember.

Four modes (core.modes) answer the same question so they can be compared.

Composed from LangChain parts (core.retrieval's Retriever for retrieval, a generation backend's chat
models for streaming, trim_messages for the history budget); the orchestration is plain Python
so that a caller gets tokens as they come and, at the end, one ``Answer`` with structured sources.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from core.decline import KnowledgeBaseTerms, decline_features, not_covered_probability
from core.evidence import EvidenceSelector, EvidenceUnit
from core.prompts import (
    NOT_COVERED, ContextChunk, best_query, build_messages, cited_numbers, condense_messages,
    drop_unknown_citations, followup_queries, narrow_chunks,
)
from core.quotes import Quote, check_answer, quote_target
from core.generation import GenerationBackend
from core.generation.base import to_langchain
from core.retrieval import Retriever, Source, prefer_newer
from ingest.uploads import readable_scopes
from core.modes import ADAPTED_MODES, MODES, NO_ADAPTER, RETRIEVING_MODES, Mode
from core.settings import Settings
from core.text import clean_text
from chatbot.citations import attribute
from chatbot.memory import ChatMemory

log = logging.getLogger(__name__)

_REFUSAL = re.compile(re.escape(NOT_COVERED), re.IGNORECASE)

@dataclass
class Answer:
    text: str
    mode: str
    conversation_id: str
    sources: list[Source] = field(default_factory=list)
    cited: list[int] = field(default_factory=list)
    query: str = ""  # the standalone question used for retrieval
    citations_attributed: bool = False  # [n] added by ragtune, not written by the model
    refused: str | None = None  # why no model answer was produced
    message_id: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    quotes: list[Quote] = field(default_factory=list)  # verified quotes shown with the answer
    removed: list[str] = field(default_factory=list)  # unverified quotes, sentences with unsupported numbers
    evidence_fallback: bool = False  # nothing of the model's answer survived the checks: the evidence is shown
    not_covered_probability: float | None = None  # core.decline's estimate, when it was asked
    decline_features: dict[str, float] = field(default_factory=dict)  # what it was computed from
    evidence: list[EvidenceUnit] = field(default_factory=list)  # the units the model read, best first

    def sources_as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.sources]


@dataclass
class ChainEvent:
    kind: Literal["token", "answer"]
    text: str = ""
    answer: Answer | None = None


class InvalidQuestion(ValueError):
    """A question that is refused before any work (empty, too long)."""


def first_paragraph(pieces: Iterator[str]) -> Iterator[str]:
    """``pieces`` up to the first line break that follows some text (blank lines before it are
    dropped); closing the stream early ends the generation."""
    started = False
    try:
        for piece in pieces:
            if not started:
                piece = piece.lstrip()
                if not piece:
                    continue
                started = True
            if "\n" in piece:
                head = piece.split("\n", 1)[0]
                if head:
                    yield head
                return
            yield piece
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # a backend's stream holds its model's lock until it is closed


class ConversationalRagChain:
    def __init__(
        self, settings: Settings, retriever: Retriever, models: GenerationBackend, memory: ChatMemory,
        evidence: EvidenceSelector | None = None, retrievers: Mapping[str, Retriever] | None = None,
        knowledge_base: KnowledgeBaseTerms | None = None,
    ):
        self.settings = settings
        # The public chunks' abbreviations and word frequencies (core.decline.public_terms): the
        # "not covered" decision reads "DAPT" as "dual antiplatelet therapy" and weighs rare words most.
        self.knowledge_base = knowledge_base or KnowledgeBaseTerms()
        self.retriever = retriever  # the base embedder's ("dense"): rag's, and the default
        # mode -> its retriever (core.retrieval.mode_retrievers decides: hybrid's searches the tuned
        # embedder's vector); a mode not in it uses ``retriever``.
        self.retrievers = dict(retrievers or {})
        self.evidence = evidence  # None: the model reads whole chunks
        self.models = models
        self.memory = memory
        self._generation_slots = threading.BoundedSemaphore(settings.chat.generation_concurrency)

    # -- public ------------------------------------------------------------------------------
    def validate(self, question: str) -> str:
        if question is not None and not isinstance(question, str):
            raise InvalidQuestion("A question is text.")
        text = clean_text(question or "").strip()  # NUL and control characters never go further
        if not text:
            raise InvalidQuestion("Please type a question.")
        limit = self.settings.chat.max_question_chars
        if len(text) > limit:
            raise InvalidQuestion(
                f"The question is {len(text):,} characters long; the limit is {limit:,}. Please shorten it."
            )
        return text

    def stream(
        self, question: str, *, owner: str, conversation_id: str | None = None, mode: Mode = "rag",
        history: list[tuple[str, str]] | None = None,
    ) -> Iterator[ChainEvent]:
        """Yield tokens as they are generated, then one ``answer`` event. Raises InvalidQuestion.

        ``history``: (question, answer) pairs that replace the stored conversation's as what the
        model and the follow-up search see (the API's request messages, the Compare view); the
        turn is still recorded in memory."""
        if mode not in MODES:
            raise InvalidQuestion(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
        text = self.validate(question)
        started = time.perf_counter()
        if conversation_id is None or not self.memory.exists(owner, conversation_id):
            conversation_id = self.memory.create(owner)
        if history is None:
            history = self.memory.turns(owner, conversation_id)
        self.memory.append(owner, conversation_id, "user", text, mode=mode)
        answer = Answer(text="", mode=mode, conversation_id=conversation_id, query=text)

        if mode in ADAPTED_MODES and not self.models.has_adapter:
            answer.refused, answer.text = "no adapter configured", NO_ADAPTER.format(mode=mode)
        elif mode in RETRIEVING_MODES:
            t0 = time.perf_counter()
            answer.query, answer.sources = self.retrieve_for(text, history, readable_scopes(owner), mode=mode)
            answer.timings["retrieval_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            if not answer.sources:
                # Nothing relevant was found: say so rather than let the model answer from nothing.
                answer.refused, answer.text = "no chunk passed retrieval.score_threshold", NOT_COVERED
            else:
                self._select_evidence(text, bool(history), answer)
        if answer.refused:
            yield ChainEvent("token", text=answer.text)
        else:
            yield from self._generate(text, history, answer, started)
        answer.timings["total_s"] = round(time.perf_counter() - started, 3)
        answer.message_id = self.memory.append(
            owner, conversation_id, "assistant", answer.text, mode=mode, sources=answer.sources_as_dicts()
        )
        yield ChainEvent("answer", answer=answer)

    def ask(self, question: str, *, owner: str, conversation_id: str | None = None, mode: Mode = "rag") -> Answer:
        for event in self.stream(question, owner=owner, conversation_id=conversation_id, mode=mode):
            if event.answer is not None:
                return event.answer
        raise AssertionError("the chain ended without an answer")

    # -- steps -------------------------------------------------------------------------------
    def _generate(
        self, question: str, history: list[tuple[str, str]], answer: Answer, started: float
    ) -> Iterator[ChainEvent]:
        adapted = answer.mode in ADAPTED_MODES
        chunks = None
        if answer.mode in RETRIEVING_MODES:
            chunks = [ContextChunk(s.text, s.title, s.source, s.page, s.section) for s in answer.sources]
            if answer.evidence:
                chunks = narrow_chunks(chunks, answer.evidence[: self.settings.retrieval.evidence.prompt_units])
        messages = self._fit(question, chunks, history, answer)
        answer.timings["prompt_tokens"] = self.models.count_prompt_tokens(messages)
        opening = self._opening_quotes(answer)
        pieces: list[str] = []
        with self._generation_slots:
            if opening:
                answer.timings["ttft_s"] = round(time.perf_counter() - started, 3)
                yield ChainEvent("token", text=opening)
                # The answer in the model's words is one paragraph ("one or two sentences", the
                # prompt says); what a 135M model writes after it repeats the quotes or the question.
                stream = first_paragraph(self.models.stream_continuation(
                    messages, opening, adapted, self.settings.llm.max_new_tokens))
            else:
                model = self.models.chat_model(adapted, self.settings.llm.max_new_tokens)
                stream = (str(c.content) for c in model.stream(to_langchain(messages)) if c.content)
            for piece in stream:
                if not pieces and not opening:
                    answer.timings["ttft_s"] = round(time.perf_counter() - started, 3)
                pieces.append(piece)
                yield ChainEvent("token", text=piece)
        continuation = "".join(pieces).strip()
        generated = self.models.count_tokens(continuation)
        generated_text = (opening + continuation).strip()
        decode_seconds = time.perf_counter() - started - answer.timings.get("ttft_s", 0.0)
        answer.timings["tokens"] = generated
        answer.timings["tokens_per_s"] = round(generated / decode_seconds, 2) if decode_seconds > 0 else 0.0
        generated_text = drop_unknown_citations(generated_text, len(answer.sources))
        answer.text = generated_text
        if answer.mode in RETRIEVING_MODES and answer.sources:
            self._check(question, answer)
        answer.cited = cited_numbers(answer.text, len(answer.sources))
        if not answer.cited and answer.sources and self.settings.chat.attribute_citations:
            answer.text, answer.cited = attribute(answer.text, [s.text for s in answer.sources])
            answer.citations_attributed = bool(answer.cited)
        for source in answer.sources:
            source.cited = source.n in answer.cited

    def _opening_quotes(self, answer: Answer) -> str:
        """The answer's opening when ``retrieval.evidence.quote_first`` applies to this mode: the
        best evidence units as ``"..." [n]`` lines, which the model then continues.

        The adapter was trained to open with the unit that states the answer, copied verbatim
        (finetune/data.py, RAFT with quotes); what a 135M model does worst in that format is the
        copying and the choice among four units, which the evidence selector does better (key-
        number recall of its top 2 units 0.711 on the demo train + validation sets). So the chain
        writes the quotes and the model writes the rest, reading its own verified opening."""
        evidence = self.settings.retrieval.evidence
        applies = evidence.quote_first == "all" or (evidence.quote_first == "adapted" and answer.mode in ADAPTED_MODES)
        if not applies or not answer.evidence or answer.mode not in RETRIEVING_MODES:
            return ""
        units = answer.evidence[: min(evidence.quote_units, evidence.prompt_units)]
        return quote_target([(u.n, u.text) for u in units], "")

    def _select_evidence(self, question: str, followup: bool, answer: Answer) -> None:
        """Rank the retrieved chunks' units, and decline when core.decline says they do not cover it."""
        if self.evidence is None or not self.settings.retrieval.evidence.enabled:
            return
        answer.evidence, answer.decline_features = self.evidence_and_features(
            question, answer.sources, followup, answer.query)
        decline = self.settings.retrieval.decline
        if not decline.enabled or not decline.weights:
            return
        answer.not_covered_probability = round(
            not_covered_probability(answer.decline_features, decline.intercept, decline.weights), 4)
        if answer.not_covered_probability >= decline.threshold:
            answer.refused = f"not covered: P = {answer.not_covered_probability:.2f} >= retrieval.decline.threshold"
            answer.text = NOT_COVERED

    def evidence_and_features(
        self, question: str, sources: list[Source], followup: bool, query: str | None = None,
    ) -> tuple[list[EvidenceUnit], dict[str, float]]:
        """The ranked evidence units and the decline features (``python -m evals.calibrate`` fits on these).
        ``query``: the standalone question retrieval used; the features read it, so that "And for an
        80-year-old?" is judged with the subject its conversation gave it."""
        assert self.evidence is not None
        # A superseded chunk is shown (marked) but never the evidence while a current one remains.
        current = [s for s in sources if s.superseded_by is None] or sources
        units = self.evidence.rank(question, [(s.n, s.text) for s in current])
        # A chunk says what its document's title says too: "Chest pain and ACS" covers "ACS"
        # where the chunk's own text only speaks of "troponin" and "DAPT".
        features = decline_features(
            query or question, [f"{s.title}\n{s.section or ''}\n{s.text}" for s in sources], sources[0].score if sources else None,
            units[0].score if units else None, followup, self.knowledge_base,
        )
        return units, features

    def _check(self, question: str, answer: Answer) -> None:
        """Keep only verified quotes and the sentences whose numbers a chunk states (core.quotes);
        when nothing survives, show the best evidence instead of an empty or invented answer."""
        if NOT_COVERED.lower() in answer.text.lower():
            if answer.not_covered_probability is None or not answer.evidence:
                return  # no calibrated decision was made: the model's refusal stands
            # Declining is the calibrated decision's to make, and it said "covered": a 135M
            # model writes the refusal it was trained on to answerable questions too. The
            # refusal is dropped; what else it wrote (its quotes) is checked as any answer.
            answer.removed.append(NOT_COVERED)
            answer.text = _REFUSAL.sub("", answer.text).strip()
        checked = check_answer(answer.text, {s.n: s.text for s in answer.sources}, question)
        answer.removed = answer.removed + checked.removed
        answer.quotes = checked.quotes
        answer.text = checked.text
        if not answer.quotes and answer.evidence:
            # The model quoted nothing verifiable: put the best unit first, as the quote it should have made.
            best = answer.evidence[0]
            answer.quotes = [Quote(n=best.n, text=best.text, verified=True)]
            answer.text = "\n\n".join(p for p in (f'"{best.text}" [{best.n}]', checked.body) if p)
        answer.evidence_fallback = bool(answer.quotes) and not checked.body
        units = self.settings.retrieval.evidence.units
        highlighted = [(q.n, q.text) for q in answer.quotes] + [(u.n, u.text) for u in answer.evidence[:units]]
        for source in answer.sources:
            source.evidence = list(dict.fromkeys(text for n, text in highlighted if n == source.n))

    def retriever_for(self, mode: str) -> Retriever:
        """The retriever ``mode`` searches with (rag's for a mode without its own)."""
        return self.retrievers.get(mode, self.retriever)

    def retrieve_for(self, question: str, history: list[tuple[str, str]],
                     scopes: list[str] | None = None, *, mode: str = "rag") -> tuple[str, list[Source]]:
        """The standalone query and its sources under ``mode``'s retriever, newer documents before
        the ones they supersede (core.retrieval.prefer_newer): what the chat, the extractive
        baseline and calibration read."""
        query, sources = self._search_for(question, history, scopes, self.retriever_for(mode))
        return query, prefer_newer(sources)

    def _search_for(self, question: str, history: list[tuple[str, str]],
                    scopes: list[str] | None, retriever: Retriever) -> tuple[str, list[Source]]:
        """The retrieval query for a follow-up, made understandable without the conversation, and
        what it finds. 'concat' tries the question alone and with earlier questions in front."""
        condense = self.settings.chat.condense
        if not history or condense == "off":
            return question, retriever.retrieve(question, scopes)
        if condense == "concat":
            found: dict[str, list[Source]] = {}

            def top_score(query: str) -> float | None:
                found[query] = retriever.retrieve(query, scopes)
                return found[query][0].score if found[query] else None

            query = best_query(followup_queries(question, history, self.settings.chat.condense_turns), top_score)
            return query, found[query]
        model = self.models.chat_model(False, max_new_tokens=64)
        with self._generation_slots:
            rewritten = model.invoke(to_langchain(condense_messages(question, history[-3:]))).content
        rewritten = str(rewritten).strip().splitlines()[0] if str(rewritten).strip() else ""
        query = rewritten or followup_queries(question, history, 1)[-1]
        return query, retriever.retrieve(query, scopes)

    def _fit(
        self, question: str, chunks: list[ContextChunk] | None, history: list[tuple[str, str]], answer: Answer,
    ) -> list[dict[str, str]]:
        """Messages within the model's context: oldest history first, then the last chunks, go."""
        from langchain_core.messages import trim_messages

        budget = self.settings.llm.context_window - self.settings.llm.max_new_tokens
        count = self.models.count_prompt_tokens

        while chunks and count(build_messages(question, chunks)) > budget:
            chunks = chunks[:-1]
            answer.sources = answer.sources[: len(chunks)]
        left = budget - count(build_messages(question, chunks))
        history_messages = to_langchain([m for q, a in history for m in (
            {"role": "user", "content": q}, {"role": "assistant", "content": a})])
        kept = trim_messages(
            history_messages, max_tokens=max(left, 0), strategy="last", start_on="human",
            token_counter=lambda ms: sum(self.models.count_tokens(str(m.content)) + 4 for m in ms),
        )
        pairs = [(str(kept[i].content), str(kept[i + 1].content)) for i in range(0, len(kept) - 1, 2)]
        return build_messages(question, chunks, pairs)
