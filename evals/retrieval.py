"""python -m evals.retrieval: dense vs BM25 vs fused retrieval, per question type. Retrieval only.

Examples:
  python -m ingest data/demo
  python -m evals.retrieval --qa data/demo/qa/test.jsonl
  python -m evals.retrieval --qa data/demo/qa/validation.jsonl --qa data/demo/qa/test.jsonl --json
  python -m evals.retrieval --qa data/demo/qa/test.jsonl --set retrieval.candidates=40
  python -m ingest tuned-vector && python -m evals.retrieval --qa data/demo/qa/test.jsonl  # + dense_tuned, fused_tuned
  python -m evals.retrieval --qa data/demo/qa/test.jsonl --set retrieval.tuned_embedder=null  # base rows only

Each method is the chat's own Retriever (core.retrieval) with only retrieval.method changed
and k = 10: 'dense' (all-MiniLM-L6-v2 cosine), 'sparse' (BM25 on the chunk text) and 'fused'
(both, reciprocal rank fusion over retrieval.candidates from each): what rag searches. With
retrieval.tuned_embedder set (settings.yaml: the committed demo-embedder LoRA) and its vector
in the collection (python -m ingest tuned-vector), two more: 'dense_tuned' and 'fused_tuned',
the same on the tuned embedder's vector, hybrid's retriever (core.retrieval.mode_retrievers). A follow-up is searched as
the chat searches it (chat.condense=concat: the question alone or with earlier questions in
front, whichever query's closest chunk scores highest, under that method). Rows: recall@1/@5/@10
of the gold document and MRR, per question type and overall; unanswerable questions have no
gold document and are left out. No chat model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.hub import ModelUnavailableError
from core.logs import setup_logging
from core.prompts import best_query, followup_queries
from core.cli import add_settings_options, cli_settings
from core.settings import Settings
from core.store import PUBLIC_SCOPE, StoreError
from evals.metrics import RECALL_AT, gold_rank, hit_at, reciprocal_rank
from evals.questions import EvalQuestion, load_questions

METHODS = ("dense", "sparse", "fused")
TUNED_METHODS = ("dense_tuned", "fused_tuned")  # hybrid's vector: the tuned embedder's


def histories(questions: Sequence[EvalQuestion]) -> dict[str, list[tuple[str, str]]]:
    """Each question's earlier turns in its conversation (questions only, as the query rule reads them)."""
    by_conversation: dict[str, list[EvalQuestion]] = defaultdict(list)
    for q in questions:
        if q.conversation_id is not None:
            by_conversation[q.conversation_id].append(q)
    out: dict[str, list[tuple[str, str]]] = {}
    for turns in by_conversation.values():
        turns.sort(key=lambda q: q.turn or 0)
        for i, q in enumerate(turns):
            out[q.id] = [(earlier.question, "") for earlier in turns[:i]]
    return out


def compare(settings: Settings, questions: Sequence[EvalQuestion]) -> list[dict[str, Any]]:
    from core.embeddings import load_embedder, load_tuned_embedder
    from core.retrieval import Retriever, tuned_retriever
    from core.store import open_store

    store = open_store(settings)
    try:
        if store.count() == 0:
            raise StoreError(f"the collection {settings.qdrant.collection!r} is empty: index the documents first "
                             "(python -m ingest data/demo)")
        embedder = load_embedder(settings.embedding)
        store.check_embedder(embedder.info)
        answerable = [q for q in questions if q.gold and not q.unanswerable]
        earlier = histories(questions)
        rows: list[dict[str, Any]] = []
        base = Retriever(store, embedder, settings)
        retrievers = {method: base.with_settings(method=method, k=max(RECALL_AT)) for method in METHODS}
        tuned = tuned_retriever(store, embedder, load_tuned_embedder(settings, embedder), settings)
        if tuned is not None:
            retrievers |= {f"{method}_tuned": tuned.with_settings(method=method, k=max(RECALL_AT))
                           for method in ("dense", "fused")}
        for method, retriever in retrievers.items():
            found: dict[str, list[Any]] = {}

            def search(query: str) -> list[Any]:
                if query not in found:
                    found[query] = retriever.retrieve(query, scopes=[PUBLIC_SCOPE])
                return found[query]

            def top_score(query: str) -> float | None:
                sources = search(query)
                return sources[0].score if sources else None

            started = time.perf_counter()
            ranks: dict[str, list[int | None]] = defaultdict(list)
            for q in answerable:
                history = earlier.get(q.id, [])
                query = (best_query(followup_queries(q.question, history, settings.chat.condense_turns), top_score)
                         if history else q.question)
                rank = gold_rank([s.source for s in search(query)], q.gold)
                ranks[q.type or "untyped"].append(rank)
                ranks["all"].append(rank)
            ms = (time.perf_counter() - started) * 1000 / max(len(found), 1)
            for kind, values in ranks.items():
                rows.append({"method": method, "type": kind, "n": len(values), "ms_per_query": round(ms, 1),
                             **{f"recall@{k}": sum(hit_at(r, k) for r in values) / len(values) for k in RECALL_AT},
                             "mrr": sum(reciprocal_rank(r) for r in values) / len(values)})
        return rows
    finally:
        store.close()


def table(rows: list[dict[str, Any]]) -> str:
    methods = [m for m in (*METHODS, *TUNED_METHODS) if any(r["method"] == m for r in rows)]
    kinds = sorted({r["type"] for r in rows}, key=lambda t: (t == "all", t))
    lines = ["| question type | n | metric | " + " | ".join(methods) + " |", "|---|---:|---|" + "---:|" * len(methods)]
    cell = {(r["type"], r["method"]): r for r in rows}
    for kind in kinds:
        n = cell[(kind, methods[0])]["n"]
        for metric in [f"recall@{k}" for k in RECALL_AT] + ["mrr"]:
            values = [cell[(kind, m)][metric] for m in methods]
            best = max(values)
            shown = [(f"**{v:.3f}**" if v == best and values.count(best) < len(values) else f"{v:.3f}") for v in values]
            lines.append(f"| {kind} | {n} | {metric} | " + " | ".join(shown) + " |")
    lines.append("| (all) | | ms per query | " + " | ".join(
        f"{cell[('all', m)]['ms_per_query']:.1f}" for m in methods) + " |")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evals.retrieval", description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--qa", type=Path, action="append", required=True, help="Q/A JSONL (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    add_settings_options(parser, "retrieval.candidates=40")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    settings = cli_settings(args)
    setup_logging("WARNING")
    questions: list[EvalQuestion] = []
    for path in args.qa:
        loaded = load_questions(path)
        for problem in loaded.problems:
            print(f"skipped {problem}", file=sys.stderr)
        questions.extend(loaded.questions)
    try:
        rows = compare(settings, questions)
    except (StoreError, ModelUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
