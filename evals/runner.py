"""Drive the chat chain over a question set, mode by mode, and write one record per answer.

Each question is asked through ``runtime.chain.ask`` exactly as the chat asks it (same prompt,
retrieval, citations, memory), with greedy decoding and the seed reset before every question,
so an interrupted and resumed run gives the records an uninterrupted one gives. Around the
chain's answer the evaluator measures what the chain does not:

- retrieval at k = 10 (``RECALL_AT``): the chain's own standalone query, searched again by a
  second ``Retriever`` whose only difference is ``retrieval.k`` (the chain keeps its k for the
  answer, so the answers are those of the configured chat);
- the closed-label likelihoods (the generation backend's ``label_logprobs``, the same backend
  and weights that answered) on the prompt the mode used (the chunks narrowed to the evidence
  units the chain showed), and in the mode it was fitted in, the adapter's label prior (evals/labels.py).

Conversations (``conversation_id`` + ``turn``) are asked in order in one chain conversation per
mode, so a follow-up has the chat memory of its earlier turns. When ``--resume`` starts in the
middle of a conversation, its earlier turns are put back into a new chain conversation from the
records (question and recorded answer), which is the history the chain would have had.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.generation import LikelihoodUnavailable
from core.modes import ADAPTED_MODES, RETRIEVING_MODES
from core.prompts import NOT_COVERED, ContextChunk, build_messages, narrow_chunks
from core.store import PUBLIC_SCOPE
from evals.labels import adapter_label_prior
from evals.metrics import RECALL_AT, score_record
from evals.questions import EvalQuestion
from evals.records import RecordLog

if TYPE_CHECKING:
    from chatbot.runtime import Runtime

log = logging.getLogger(__name__)

# The owner of the evaluation's conversations in the run's own history database.
OWNER = "evals"
# The baseline column with no generation at all (issue 12): generation has to beat it.
EXTRACTIVE = "extractive"
EXTRACTIVE_SENTENCES = 2


class Evaluator:
    def __init__(self, runtime: "Runtime", records: RecordLog, seed: int = 0):
        self.runtime = runtime
        self.chain = runtime.chain
        self.records = records
        self.seed = seed
        settings = runtime.settings
        # Per mode: hybrid may search the tuned embedder's vector (core.retrieval.mode_retrievers).
        self.recall_retrievers = {mode: self.chain.retriever_for(mode).with_settings(k=max(RECALL_AT))
                                  for mode in RETRIEVING_MODES}
        self._conversations: dict[tuple[str, str], str] = {}  # (mode, set's conversation id) -> chain's id
        # The adapter's yes/no/maybe offsets (evals/labels.py), applied to the adapted modes' labels.
        self.label_prior = adapter_label_prior(runtime.generation.describe().get("adapter"))

    # -- the loop ----------------------------------------------------------------------------
    def run(self, questions: Sequence[EvalQuestion], modes: Sequence[str], progress: bool = True) -> int:
        """Answer every (mode, question) not yet recorded; returns how many were answered now."""
        from tqdm import tqdm

        done = self.records.done()
        total = len(modes) * len(questions)
        already = sum((mode, q.id) in done for mode in modes for q in questions)
        answered = 0
        bar = tqdm(total=total, initial=already, desc="evals", unit="q", disable=not progress, dynamic_ncols=True)
        with bar:
            for mode in modes:
                pending = [q for q in questions if (mode, q.id) not in done]
                if not pending:
                    continue
                bar.set_postfix_str(f"{mode}: loading model")
                self.warm_up(mode)  # model loading is not a question's time to first token
                bar.set_postfix_str(mode)
                for question in pending:
                    self.records.append(self.evaluate(mode, question))
                    answered += 1
                    bar.update(1)
        return answered

    def warm_up(self, mode: str) -> None:
        if mode != EXTRACTIVE:
            self.chain.models.warm_up(mode in ADAPTED_MODES)

    # -- one question ------------------------------------------------------------------------
    def evaluate(self, mode: str, question: EvalQuestion) -> dict[str, Any]:
        from transformers import set_seed

        from chatbot.chain import InvalidQuestion

        set_seed(self.seed)
        record: dict[str, Any] = {"mode": mode, **question.as_record_fields()}
        if mode == EXTRACTIVE:
            return self._extract(question, record)
        conversation = self._chain_conversation(mode, question)
        try:
            answer = self.chain.ask(question.question, owner=OWNER, conversation_id=conversation, mode=mode)
        except InvalidQuestion as exc:  # e.g. longer than chat.max_question_chars: scored as a failure
            record |= {"answer": "", "error": str(exc), "retrieved": [] if mode in RETRIEVING_MODES else None,
                       "sources": [], "cited": [], "timings": {}}
            record["scores"] = score_record(record)
            return record
        if question.conversation_id is not None:
            self._conversations[(mode, question.conversation_id)] = answer.conversation_id

        retrieved = None
        if mode in RETRIEVING_MODES:
            retrieved = [
                {"source": s.source, "page": s.page, "score": s.score}
                for s in self.recall_retrievers[mode].retrieve(answer.query, scopes=[PUBLIC_SCOPE])
            ]
        record |= {
            "query": answer.query,
            "retrieved": retrieved,
            "answer": answer.text,
            "refused": answer.refused,
            "sources": [
                {"n": s.n, "source": s.source, "title": s.title, "page": s.page, "section": s.section,
                 "score": s.score, "cited": s.cited, "text": s.text, "evidence": s.evidence,
                 "superseded_by": s.superseded_by}
                for s in answer.sources
            ],
            "quotes": [{"n": q.n, "text": q.text, "verified": q.verified} for q in answer.quotes],
            "removed_quotes": [r for r in answer.removed if r.startswith('"')],
            "removed": answer.removed,
            "evidence_fallback": answer.evidence_fallback,
            "not_covered_probability": answer.not_covered_probability,
            "decline_features": answer.decline_features,
            "cited": answer.cited,
            "citations_attributed": answer.citations_attributed,
            "timings": answer.timings,
            "chat_conversation_id": answer.conversation_id,
        }
        if question.label:
            record["label_logprobs"] = self._label_logprobs(
                question, answer, adapted=mode in ADAPTED_MODES, retrieving=mode in RETRIEVING_MODES)
            if self.label_prior and mode == self.label_prior["mode"]:
                record["label_prior"] = self.label_prior["offsets"]
        record["scores"] = score_record(record)
        return record

    def _extract(self, question: EvalQuestion, record: dict[str, Any]) -> dict[str, Any]:
        """The extractive baseline: the chat's own retrieval (follow-ups condensed as the chat does),
        and for an answer the 2 sentences closest to the question by the same embedder. No model."""
        import time

        from core.evidence import closest_sentences

        started = time.perf_counter()
        memory = self.chain.memory
        conversation = self._chain_conversation(EXTRACTIVE, question)
        history = memory.turns(OWNER, conversation) if conversation else []
        query, sources = self.chain.retrieve_for(question.question, history, [PUBLIC_SCOPE])
        units = closest_sentences(self.runtime.embedder.embeddings, question.question,
                                  [(s.n, s.text) for s in sources], limit=EXTRACTIVE_SENTENCES)
        answer = " ".join(f"{u.text} [{u.n}]" for u in sorted(units, key=lambda u: (u.n, u.index)))
        answer = answer or NOT_COVERED
        conversation = conversation or memory.create(OWNER)
        memory.append(OWNER, conversation, "user", question.question, mode=EXTRACTIVE)
        memory.append(OWNER, conversation, "assistant", answer, mode=EXTRACTIVE)
        if question.conversation_id is not None:
            self._conversations[(EXTRACTIVE, question.conversation_id)] = conversation
        cited = sorted({u.n for u in units})
        record |= {
            "query": query,
            "retrieved": [{"source": s.source, "page": s.page, "score": s.score}
                          for s in self.recall_retrievers["rag"].retrieve(query, scopes=[PUBLIC_SCOPE])],
            "answer": answer, "refused": None if units else "nothing retrieved",
            "sources": [{"n": s.n, "source": s.source, "title": s.title, "page": s.page, "section": s.section,
                         "score": s.score, "cited": s.n in cited, "text": s.text} for s in sources],
            "cited": cited, "citations_attributed": False,
            "timings": {"total_s": round(time.perf_counter() - started, 3)},
            "chat_conversation_id": conversation,
        }
        record["scores"] = score_record(record)
        return record

    def _label_logprobs(self, question: EvalQuestion, answer: Any, *, adapted: bool,
                        retrieving: bool) -> dict[str, float] | None:
        # The chunks the model saw (the chain may drop the last ones to fit its context), or
        # none at all; when retrieval found nothing the chain answers NOT_COVERED itself, and
        # the likelihood is read on the prompt it would have sent ("Documents: none were found").
        chunks = None
        if retrieving:
            chunks = [ContextChunk(s.text, s.title, s.source, s.page, s.section) for s in answer.sources]
            if answer.evidence:  # narrowed to the evidence units, as the chain's prompt was (chain._generate)
                chunks = narrow_chunks(chunks, answer.evidence[: self.runtime.settings.retrieval.evidence.prompt_units])
        history = self.chain.memory.turns(OWNER, answer.conversation_id)[:-1]  # without this turn
        try:
            scores = self.chain.models.label_logprobs(build_messages(question.question, chunks, history), adapted)
        except LikelihoodUnavailable:  # a served model (llm.backend=openai)
            return None
        # Rounded once, here: the label is chosen from the stored values, so the JSON re-scores alike.
        return {label: round(value, 6) for label, value in scores.items()}

    def _chain_conversation(self, mode: str, question: EvalQuestion) -> str | None:
        """The chain conversation a turn continues, or None for a new one."""
        if question.conversation_id is None:
            return None
        known = self._conversations.get((mode, question.conversation_id))
        if known is not None:
            return known
        earlier = sorted(
            (r for r in self.records.records
             if r["mode"] == mode and r.get("conversation_id") == question.conversation_id
             and (r.get("turn") or 0) < (question.turn or 0)),
            key=lambda r: r.get("turn") or 0,
        )
        if not earlier:
            return None
        memory = self.chain.memory
        conversation = memory.create(OWNER)
        for turn in earlier:
            memory.append(OWNER, conversation, "user", turn["question"], mode=mode)
            memory.append(OWNER, conversation, "assistant", turn.get("answer") or "", mode=mode)
        log.info("resumed conversation %s (%s) after %d recorded turn(s)", question.conversation_id, mode, len(earlier))
        return conversation
