"""python -m evals.followups: which retrieval query should a follow-up search with? Retrieval only.

Examples:
  python -m ingest data/demo
  python -m evals.followups --qa data/demo/qa/train.jsonl --qa data/demo/qa/validation.jsonl \\
      --qa data/demo/qa/test.jsonl
  python -m evals.followups --qa data/demo/qa/test.jsonl --set chat.condense_turns=3

Compares the rules ``chat.condense: concat`` could follow, on the chain's own retriever (k=10):
  previous   the previous question in front of the follow-up (ragtune's rule until 2026-11)
  last-N     always the last N = chat.condense_turns questions in front
  best       the chain's rule: the question alone or with 1..N earlier questions in front,
             whichever query's closest chunk scores highest (core.prompts.best_query)

Two tables: recall@1/@5 of the gold document for follow-up turns, by turn (their earlier turns
are the history); and, for questions that stand alone, recall@1 when 1..N unrelated questions
(seeded draws from other gold documents) were asked before them in the same conversation: what
a rule costs when the user changes the subject. No model is loaded: nothing is generated.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from core.logs import setup_logging
from core.prompts import best_query, followup_queries
from core.cli import add_settings_options, cli_settings
from core.settings import Settings
from core.store import StoreError
from evals.metrics import RECALL_AT, gold_rank
from evals.questions import EvalQuestion, load_questions

Rule = Callable[[str, list[tuple[str, str]]], str]


def rules(turns: int, top_score: Callable[[str], float | None]) -> dict[str, Rule]:
    return {
        "previous": lambda q, history: followup_queries(q, history, 1)[-1],
        f"last-{turns}": lambda q, history: followup_queries(q, history, turns)[-1],
        "best": lambda q, history: best_query(followup_queries(q, history, turns), top_score),
    }


def followup_cases(questions: Sequence[EvalQuestion]) -> list[tuple[EvalQuestion, list[tuple[str, str]]]]:
    """Follow-up turns with a gold document, each with its earlier turns as history."""
    conversations: dict[str, list[EvalQuestion]] = defaultdict(list)
    for q in questions:
        if q.conversation_id is not None:
            conversations[q.conversation_id].append(q)
    cases = []
    for turns in conversations.values():
        turns.sort(key=lambda q: q.turn or 0)
        for i, q in enumerate(turns):
            if i and q.gold and not q.unanswerable:
                cases.append((q, [(earlier.question, "") for earlier in turns[:i]]))
    return cases


def subject_change_cases(
    questions: Sequence[EvalQuestion], turns: int, seed: int,
) -> list[tuple[EvalQuestion, list[tuple[str, str]]]]:
    """Questions that stand alone, each after ``turns`` unrelated ones (other gold documents)."""
    rng = random.Random(seed)
    with_gold = [q for q in questions if q.gold and not q.unanswerable]
    cases = []
    for q in with_gold:
        if q.conversation_id is not None:
            continue
        others = [o for o in with_gold if o.gold != q.gold]
        if len(others) >= turns:
            cases.append((q, [(o.question, "") for o in rng.sample(others, turns)]))
    return cases


def compare(settings: Settings, paths: Sequence[Path], seed: int) -> str:
    from chatbot.runtime import build_runtime

    questions: list[EvalQuestion] = []
    for path in paths:
        loaded = load_questions(path)
        for problem in loaded.problems:
            print(f"skipped {problem}", file=sys.stderr)
        questions.extend(loaded.questions)
    settings = settings.model_copy(update={"retrieval": settings.retrieval.model_copy(update={"k": max(RECALL_AT)})})
    runtime = build_runtime(settings)  # the chat model stays unloaded: nothing here generates
    try:
        if runtime.store.count() == 0:
            raise StoreError(f"the collection {settings.qdrant.collection!r} is empty: index the documents first "
                             "(python -m ingest data/demo)")
        retriever = runtime.chain.retriever
        found: dict[str, list[str]] = {}
        scores: dict[str, float | None] = {}

        def search(query: str) -> list[str]:
            if query not in found:
                sources = retriever.retrieve(query)
                found[query] = [s.source for s in sources]
                scores[query] = sources[0].score if sources else None
            return found[query]

        def top_score(query: str) -> float | None:
            search(query)
            return scores[query]

        turns = settings.chat.condense_turns
        compared = rules(turns, top_score)
        followups = followup_cases(questions)
        by_turn: dict[int, list[tuple[EvalQuestion, list[tuple[str, str]]]]] = defaultdict(list)
        for case in followups:
            by_turn[case[0].turn or 0].append(case)
        lines = ["Follow-up turns: recall@1 / recall@5 of the gold document", "",
                 "| rule | " + " | ".join(f"turn {t} (n={len(c)})" for t, c in sorted(by_turn.items())) + " |",
                 "|---|" + "---:|" * len(by_turn)]
        for name, rule in compared.items():
            cells = []
            for _, cases in sorted(by_turn.items()):
                ranks = [gold_rank(search(rule(q.question, history)), q.gold) for q, history in cases]
                cells.append(f"{_share(ranks, 1):.2f} / {_share(ranks, 5):.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "A new subject: recall@1 of a standalone question after unrelated earlier questions", "",
                  "| rule | " + " | ".join(f"after {n}" for n in range(turns + 1)) + " |",
                  "|---|" + "---:|" * (turns + 1)]
        changes = subject_change_cases(questions, turns, seed)
        for name, rule in compared.items():
            cells = []
            for n in range(turns + 1):
                ranks = [gold_rank(search(rule(q.question, history[turns - n:])), q.gold) for q, history in changes]
                cells.append(f"{_share(ranks, 1):.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"{len(followups)} follow-up turns, {len(changes)} standalone questions "
                  f"(seed {seed}); collection {settings.qdrant.collection!r}, embedder {runtime.embedder.info.name}"]
        return "\n".join(lines)
    finally:
        runtime.close()


def _share(ranks: Sequence[int | None], k: int) -> float:
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks) if ranks else 0.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evals.followups", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--qa", type=Path, action="append", required=True,
                        help="question set (JSONL, the demo's format); repeat to pool several")
    parser.add_argument("--collection", help="Qdrant collection to retrieve from (default qdrant.collection)")
    parser.add_argument("--seed", type=int, default=0, help="draws of the unrelated earlier questions (default 0)")
    add_settings_options(parser, "chat.condense_turns=3")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = cli_settings(args, {"qdrant": {"collection": args.collection}} if args.collection else None)
    setup_logging(settings.log_level)
    for path in args.qa:
        if not path.is_file():
            print(f"error: {path}: no such question set", file=sys.stderr)
            return 2
    try:
        print(compare(settings, args.qa, args.seed))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
