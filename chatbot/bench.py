"""python -m chatbot.bench: per-mode latency and speed of the chat over the demo questions.

For each mode: time to first token, decode tokens/s, retrieval ms and total seconds per
question (mean and worst), greedy decoding, one warm-up question first so that model loading
is not counted. Modes that need an adapter are skipped, with a note, when none is configured.

Examples:
  python -m chatbot.bench                                  # rag and base on the demo examples
  python -m chatbot.bench --set llm.adapter=demo           # all four modes
  python -m chatbot.bench --qa data/demo/qa/test.jsonl --limit 10 --modes rag,hybrid
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from core.jsonl import InputError
from core.logs import setup_logging
from core.settings import load_settings, parse_overrides


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatbot.bench", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--modes", default="hybrid,rag,finetuned,base")
    parser.add_argument("--qa", type=Path, help="JSONL with a 'question' field (default: chat.examples)")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--settings", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    settings = load_settings(args.settings, parse_overrides(args.overrides))
    setup_logging("WARNING")
    from chatbot.runtime import build_runtime

    if args.qa:
        from core.qa import load_qa

        try:
            records = load_qa(args.qa)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # A follow-up alone would be asked without its conversation: standalone questions only.
        questions = [r.question for r in records if not r.followup][: args.limit]
    else:
        questions = settings.chat.examples[: args.limit]
    # History goes to a scratch database: benchmark turns are not anyone's conversations.
    with tempfile.TemporaryDirectory() as scratch:
        settings = settings.model_copy(update={"chat": settings.chat.model_copy(update={"history_db": Path(scratch) / "bench.sqlite3"})})
        runtime = build_runtime(settings)
        if runtime.collection.count() == 0:
            print("the collection is empty: run python -m ingest data/demo first")
            return 1
        print(f"{len(questions)} questions; llm={runtime.chain.models.raw(False).base_name}, "
              f"adapter={settings.llm.adapter}, max_new_tokens={settings.llm.max_new_tokens}, k={settings.retrieval.k}")
        print("| mode | TTFT s (mean / max) | tokens/s | retrieval ms | total s (mean / max) | answer tokens |")
        print("|---|---|---|---|---|---|")
        for mode in args.modes.split(","):
            if mode in ("hybrid", "finetuned") and not runtime.chain.models.has_adapter:
                print(f"| {mode} | skipped: no adapter (llm.adapter) | | | | |")
                continue
            runtime.chain.ask(questions[0], owner="bench", mode=mode)  # warm-up: loads the model
            timings = [runtime.chain.ask(q, owner="bench", mode=mode).timings for q in questions]
            answered = [t for t in timings if "ttft_s" in t]

            def mean(key: str, items=answered) -> float:
                values = [t[key] for t in items if key in t]
                return statistics.mean(values) if values else 0.0

            ttft = [t["ttft_s"] for t in answered] or [0.0]
            total = [t["total_s"] for t in timings]
            print(f"| {mode} | {mean('ttft_s'):.2f} / {max(ttft):.2f} | {mean('tokens_per_s'):.1f} | "
                  f"{mean('retrieval_ms', timings):.0f} | {statistics.mean(total):.2f} / {max(total):.2f} | "
                  f"{mean('tokens'):.0f} |")
        runtime.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
