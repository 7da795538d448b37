"""python -m evals.calibrate: fit when the chat says "not covered" (retrieval.decline), on a question set.

For every question of the set (the validation set, never the test set), the chat's own retrieval
and evidence selection run as in the chat (no generation: a few minutes on a CPU), and
core.decline's features are recorded; unanswerable questions are the positives. A logistic model
is fitted on all of them, and 5-fold cross-validation prints the trade-off the threshold sets:
the share of answerable questions declined against the share of unanswerable ones declined.
The fitted block is printed as YAML for settings.yaml (retrieval.decline), or written there with
--write.

Examples:
  python -m evals.calibrate --qa data/demo/qa/validation.jsonl
  python -m evals.calibrate --qa data/demo/qa/validation.jsonl --qa data/demo/qa/train.jsonl --threshold 0.6
  python -m evals.calibrate --qa data/demo/qa/validation.jsonl --rows /tmp/decline.jsonl --write settings.yaml
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from core.cli import add_settings_options, cli_settings
from core.decline import FEATURES, fit_logistic, not_covered_probability
from core.logs import setup_logging
from core.store import PUBLIC_SCOPE

THRESHOLDS = (0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evals.calibrate", description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--qa", type=Path, action="append", required=True,
                        help="question set(s) with unanswerable questions (repeatable); not the test set")
    parser.add_argument("--threshold", type=float, default=0.5, help="the threshold to write (default 0.5)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds for the curve (default 5)")
    parser.add_argument("--rows", type=Path, metavar="JSONL",
                        help="keep each question's features here, and refit from this file if it exists "
                             "(no retrieval: seconds instead of minutes)")
    parser.add_argument("--write", type=Path, metavar="SETTINGS_YAML",
                        help="replace the retrieval.decline block of this settings file")
    add_settings_options(parser, "data_dir=/tmp/run")
    return parser


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect(runtime: Any, questions: list[Any]) -> list[tuple[dict[str, float], int]]:
    """(features, 1 if unanswerable) per question; a follow-up's history is its earlier turns'
    questions and reference answers, as in the fine-tuning data."""
    from tqdm import tqdm

    chain = runtime.chain
    turns: dict[str, list[Any]] = defaultdict(list)
    for q in questions:
        if q.conversation_id is not None:
            turns[q.conversation_id].append(q)
    rows = []
    for q in tqdm(questions, desc="calibrate", disable=not sys.stderr.isatty()):
        earlier = [t for t in turns.get(q.conversation_id or "", []) if (t.turn or 0) < (q.turn or 0)]
        history = [(t.question, t.reference or "") for t in sorted(earlier, key=lambda t: t.turn or 0)]
        query, sources = chain.retrieve_for(q.question, history, [PUBLIC_SCOPE])
        if not sources:
            features = {name: 0.0 for name in FEATURES} | {"followup": float(bool(history))}
        else:
            _, features = chain.evidence_and_features(q.question, sources, bool(history), query)
        rows.append((features, int(bool(q.unanswerable))))
    return rows


def cross_validated(rows: list[tuple[dict[str, float], int]], folds: int, seed: int = 0) -> list[float]:
    """Each question's P(not covered) from a model fitted on the other folds."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    probability = [0.0] * len(rows)
    for fold in range(folds):
        test = set(order[fold::folds])
        train = [rows[i] for i in order if i not in test]
        intercept, weights = fit_logistic([f for f, _ in train], [y for _, y in train])
        for i in test:
            probability[i] = not_covered_probability(rows[i][0], intercept, weights)
    return probability


def roc_auc(probability: list[float], labels: list[int]) -> float:
    """The chance that an unanswerable question gets a higher P than an answerable one (ties: half)."""
    positive = [p for p, y in zip(probability, labels) if y == 1]
    negative = [p for p, y in zip(probability, labels) if y == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


def curve(rows: list[tuple[dict[str, float], int]], probability: list[float]) -> list[tuple[float, float, float]]:
    """(threshold, answerable declined, unanswerable declined) for the cross-validated P."""
    answerable = [p for p, (_, y) in zip(probability, rows) if y == 0]
    unanswerable = [p for p, (_, y) in zip(probability, rows) if y == 1]
    return [(t, sum(p >= t for p in answerable) / len(answerable), sum(p >= t for p in unanswerable) / len(unanswerable))
            for t in THRESHOLDS]


def decline_yaml(intercept: float, weights: dict[str, float], threshold: float) -> str:
    lines = ["  decline:                     # fitted by python -m evals.calibrate (docs/evals.md)",
             "    enabled: true", f"    threshold: {threshold}", f"    intercept: {intercept}", "    weights:"]
    lines += [f"      {name}: {value}" for name, value in weights.items()]
    return "\n".join(lines) + "\n"


def write_block(path: Path, block: str) -> None:
    """Replace (or add) the ``decline:`` block under ``retrieval:`` and keep the rest of the file."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out, i, done = [], 0, False
    while i < len(lines):
        line = lines[i]
        if line.startswith("  decline:") and not done:
            i += 1
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                i += 1
            out.append(block)
            done = True
            continue
        out.append(line)
        if line.startswith("retrieval:") and not any(l.startswith("  decline:") for l in lines):
            out.append(block)
            done = True
        i += 1
    if not done:
        out.append("retrieval:\n" + block)
    path.write_text("".join(out), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    settings = cli_settings(args)
    setup_logging(settings.log_level)
    from chatbot.runtime import build_runtime
    from evals.questions import load_questions

    if args.rows and args.rows.is_file():
        rows = [(r["features"], r["unanswerable"]) for r in read_jsonl(args.rows)]
    else:
        questions = [q for path in args.qa for q in load_questions(path).questions]
        runtime = build_runtime(settings)
        try:
            if runtime.chain.evidence is None:
                print("error: retrieval.evidence is off; the decline features need it", file=sys.stderr)
                return 2
            rows = collect(runtime, questions)
        finally:
            runtime.close()
        if args.rows:
            args.rows.write_text("".join(json.dumps({"id": q.id, "features": f, "unanswerable": y}) + "\n"
                                         for q, (f, y) in zip(questions, rows)), encoding="utf-8")
    positives = sum(y for _, y in rows)
    if positives == 0 or positives == len(rows):
        print("error: the question set needs both answerable and unanswerable questions", file=sys.stderr)
        return 2
    probability = cross_validated(rows, args.folds)
    auc = roc_auc(probability, [y for _, y in rows])
    print(f"{len(rows)} questions ({positives} unanswerable); {args.folds}-fold cross-validated trade-off "
          f"(ROC AUC {auc:.3f}):")
    print("| threshold | answerable declined | unanswerable declined |\n|---:|---:|---:|")
    for threshold, wrong, right in curve(rows, probability):
        print(f"| {threshold:.2f} | {100 * wrong:.1f}% | {100 * right:.1f}% |")
    intercept, weights = fit_logistic([f for f, _ in rows], [y for _, y in rows])
    block = decline_yaml(intercept, weights, args.threshold)
    print("\nretrieval:\n" + block)
    if args.write:
        write_block(args.write, block)
        print(f"wrote retrieval.decline into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
