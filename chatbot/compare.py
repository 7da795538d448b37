"""The Compare view's service: one question answered by every mode, one mode after another.

"RAG, fine-tuning, or both?" is the question ragtune answers; this shows it for one question.
Each mode gets the same history (the open chat conversation's, from memory: the chat's history
rules) through ``chain.stream(history=...)``, so no mode sees another's answer. The modes run
one after another inside one queued event (the page's ``generate`` queue): no extra concurrency.

The answers are recorded, all four in one conversation of the owner's compare space
(``<owner>#compare``), so that they never show in the chat's list of past conversations.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from chatbot.chain import ConversationalRagChain
from core.modes import MODES, Mode

# Least to most: no help, retrieval, the adapter, both (the order a reader builds the case in).
COMPARE_ORDER: tuple[Mode, ...] = ("base", "rag", "finetuned", "hybrid")
assert sorted(COMPARE_ORDER) == sorted(MODES), "the Compare view shows every mode of core.modes"
COMPARE_SUFFIX = "#compare"
REPORT_PATH = "docs/evals.md"


@dataclass
class ModeResult:
    mode: Mode
    text: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)
    citations_attributed: bool = False
    ttft_s: float | None = None  # from this mode's start to its first token
    total_s: float | None = None
    refused: str | None = None
    state: str = "waiting"  # waiting -> answering -> done

    def timing(self) -> str:
        if self.state == "waiting":
            return "waiting for the modes before it…"
        ttft = f"first token {self.ttft_s:.2f} s" if self.ttft_s is not None else "first token –"
        total = f" · total {self.total_s:.2f} s" if self.total_s is not None else " · answering…"
        return ttft + total + (f" · {self.refused}" if self.refused else "")


def compare_owner(owner: str) -> str:
    return owner + COMPARE_SUFFIX


def favoured_note(mode: str) -> str:
    return (f"The evals favour **{mode}** for this knowledge base (`chat.default_mode`; the report: "
            f"[{REPORT_PATH}]({REPORT_PATH})). Each mode answers in turn, with the chat's history.")


class CompareService:
    def __init__(self, chain: ConversationalRagChain):
        self.chain = chain

    def run(self, question: str, *, owner: str, history: list[tuple[str, str]] | None = None,
            modes: tuple[Mode, ...] = COMPARE_ORDER) -> Iterator[dict[Mode, ModeResult]]:
        """Yield the results of every mode after each step (a token, a finished mode), so a page
        can stream each column. Raises InvalidQuestion before any mode runs."""
        text = self.chain.validate(question)
        results = {mode: ModeResult(mode) for mode in modes}
        conversation_id: str | None = None
        for mode in modes:
            result = results[mode]
            result.state = "answering"
            started = time.perf_counter()
            yield results
            for event in self.chain.stream(text, owner=compare_owner(owner), conversation_id=conversation_id,
                                           mode=mode, history=list(history or [])):
                if event.answer is None:
                    if result.ttft_s is None and event.text:
                        result.ttft_s = round(time.perf_counter() - started, 2)
                    result.text += event.text
                    yield results
                    continue
                answer = event.answer
                conversation_id = answer.conversation_id
                result.text = answer.text  # with ragtune's citations, as stored
                result.sources = answer.sources_as_dicts()
                result.citations_attributed = answer.citations_attributed
                result.refused = answer.refused
                result.total_s = round(time.perf_counter() - started, 2)
                result.state = "done"
            yield results
