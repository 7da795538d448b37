"""python -m chatbot.bench: per-mode latency and speed of the chat, beside bare llama.cpp, in one run.

For each mode: time to first token (retrieval included), decode tokens/s, retrieval ms, prompt
tokens and total seconds per question (mean and worst), greedy decoding, one warm-up question
first so that model loading is not counted. Then the anchors, on the same questions:

- ``bare llama.cpp``: llama-cpp-python's ``Llama`` alone on the same GGUF, with the same
  threads, batch size and sampling, fed the rag prompt the chain builds for each question (the
  retrieved chunks, rendered with the GGUF's chat template): what ragtune's rag and hybrid rows
  are measured against (its TTFT has no retrieval in it);
- ``--anchor transformers``: the rag and hybrid modes again through llm.backend=transformers
  (torch fp32 + PEFT), the path ragtune served before llama.cpp.

The last lines print the issue's targets beside the figures (hybrid decode >= 0.9x bare
llama.cpp and >= 5x transformers, TTFT <= 1.0 s with 4 chunks, total <= 5 s per answer).
Timings on a machine that others share are not comparable with an idle one: re-run there.

Examples:
  python -m ingest data/demo
  python -m chatbot.bench                                        # rag, hybrid + bare llama.cpp
  python -m chatbot.bench --modes rag,hybrid --anchor transformers  # + the old transformers path
  python -m chatbot.bench --qa data/demo/qa/test.jsonl --limit 10 --modes hybrid,rag,finetuned,base
  python -m chatbot.bench --set llm.threads=1 --set llm.n_batch=256
  python -m chatbot.bench --options 3                            # llama.cpp options side by side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from core.jsonl import InputError
from core.logs import setup_logging
from core.modes import ADAPTED_MODES, MODES
from core.settings import Settings, load_settings, parse_overrides

HEADER = ("| path | TTFT s (mean / max) | decode tokens/s | retrieval ms | prompt tokens | total s (mean / max) "
          "| answer tokens |\n|---|---|---|---|---|---|---|")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatbot.bench", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Examples:", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--modes", default="rag,hybrid", help=f"comma-separated, of {', '.join(MODES)} (default rag,hybrid)")
    parser.add_argument("--qa", type=Path, help="JSONL with a 'question' field (default: chat.examples)")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--anchor", choices=["transformers"], action="append", default=[],
                        help="also run rag and hybrid through this backend (the old path)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare llama.cpp anchor")
    parser.add_argument("--options", type=int, metavar="ROUNDS", nargs="?", const=3,
                        help="instead: llama.cpp's prefill/decode options (precision, threads, n_batch, flash "
                             "attention, LoRA merged or not, prefix reuse), best of ROUNDS (default 3)")
    parser.add_argument("--settings", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    return parser


def _row(label: str, timings: list[dict[str, float]]) -> dict[str, float]:
    answered = [t for t in timings if "ttft_s" in t]

    def mean(key: str, items: list[dict[str, float]] = answered) -> float:
        values = [t[key] for t in items if key in t]
        return statistics.mean(values) if values else 0.0

    # Decode speed pooled over the answers (all tokens / all decode time): a one-token answer's
    # ratio would otherwise weigh as much as a 256-token one.
    decode_s = sum(t["total_s"] - t["ttft_s"] for t in answered)
    figures = {
        "ttft": mean("ttft_s"), "ttft_max": max((t["ttft_s"] for t in answered), default=0.0),
        "tokens_per_s": sum(t["tokens"] for t in answered) / decode_s if decode_s > 0 else 0.0,
        "retrieval_ms": mean("retrieval_ms", timings), "prompt_tokens": mean("prompt_tokens"),
        "total": statistics.mean(t["total_s"] for t in timings) if timings else 0.0,
        "total_max": max((t["total_s"] for t in timings), default=0.0), "tokens": mean("tokens"),
    }
    print(f"| {label} | {figures['ttft']:.2f} / {figures['ttft_max']:.2f} | {figures['tokens_per_s']:.1f} | "
          f"{figures['retrieval_ms']:.0f} | {figures['prompt_tokens']:.0f} | {figures['total']:.2f} / "
          f"{figures['total_max']:.2f} | {figures['tokens']:.0f} |", flush=True)
    return figures


def _chain_rows(runtime: Any, modes: list[str], questions: list[str], prefix: str = "") -> dict[str, dict[str, float]]:
    rows = {}
    for mode in modes:
        if mode in ADAPTED_MODES and not runtime.chain.models.has_adapter:
            print(f"| {prefix}{mode} | skipped: no adapter (llm.adapter) | | | | | |")
            continue
        runtime.chain.ask(questions[0], owner="bench", mode=mode)  # warm-up: loads the model
        rows[mode] = _row(f"{prefix}{mode}", [runtime.chain.ask(q, owner="bench", mode=mode).timings for q in questions])
    return rows


def _bare_llamacpp(runtime: Any, questions: list[str]) -> dict[str, float]:
    """llama-cpp-python alone on the rag prompts: the same GGUF, threads, batch and sampling."""
    from core.generation.llamacpp import LlamaInstance, open_llama
    from core.prompts import ContextChunk, build_messages

    settings = runtime.settings
    gguf = Path(runtime.generation.describe()["weights"])  # the GGUF the backend serves
    instance = LlamaInstance(open_llama(gguf, settings))
    llm = settings.llm
    sampling = {"max_tokens": llm.max_new_tokens, "temperature": llm.temperature,
                "repeat_penalty": llm.repetition_penalty, "seed": 0, "stop": [instance.eos_text]}
    prompts = []
    for question in questions:
        chunks = [ContextChunk(s.text, s.title, s.source, s.page, s.section)
                  for s in runtime.chain.retriever.retrieve(question)]
        prompts.append(instance.prompt_tokens(build_messages(question, chunks)))
    try:
        timings = []
        for tokens in [prompts[0], *prompts]:  # the first once more, as a warm-up
            started = time.perf_counter()
            first, pieces = None, []
            for piece in instance.stream(tokens, **sampling):
                first = first or time.perf_counter()
                pieces.append(piece)
            end = time.perf_counter()
            generated = len(instance.text_tokens("".join(pieces).strip()))
            timings.append({"ttft_s": (first or end) - started, "total_s": end - started, "tokens": generated,
                            "prompt_tokens": len(tokens)})
        return _row("bare llama.cpp (base, rag prompt)", timings[1:])
    finally:
        instance.llama.close()


def _options(runtime: Any, questions: list[str], rounds: int) -> None:
    """Prefill and decode speed of llama.cpp options on the rag prompt of the first question.

    Configurations are measured in turn, ``rounds`` times, and each keeps its best round, so a
    burst of load on a shared machine penalises one measurement rather than one configuration.
    Prefill: the whole prompt from an empty cache; decode: 64 single-token steps after it;
    prefix reuse: the second question's prompt right after the first's (the system prompt and
    their common start stay in the KV cache) against the same prompt from an empty cache.
    """
    from core.generation.llamacpp import ADAPTER_GGUF, LlamaInstance, open_llama, resolve_gguf, threads
    from core.gguf import dequantized_gguf, merged_gguf
    from core.llm import packaged_gguf_path
    from core.prompts import ContextChunk, build_messages

    settings = runtime.settings
    models = settings.models_dir
    shipped = packaged_gguf_path()
    ggufs = {"shipped Q4_1": shipped}
    for precision in ("f16", "bf16", "f32"):
        path = models / f"{shipped.stem.rsplit('.', 1)[0]}.{precision.upper()}.gguf"
        ggufs[precision.upper()] = path if path.is_file() else dequantized_gguf(shipped, path, precision)
    served = resolve_gguf(settings)
    description = runtime.generation.describe()
    lora = Path(description["adapter"]) / ADAPTER_GGUF if description.get("adapter") else None
    decode, prefill = threads(settings.llm.threads)
    cores = os.cpu_count() or 1
    configs: list[tuple[str, Path, Path | None, dict[str, Any]]] = [
        (f"{name}, threads {decode} decode / {prefill} prefill, n_batch {settings.llm.n_batch}", path, None, {})
        for name, path in ggufs.items()]
    configs += [
        (f"{served.name}, 1 thread", served, None, {"n_threads": 1, "n_threads_batch": 1}),
        (f"{served.name}, {cores} threads", served, None, {"n_threads": cores, "n_threads_batch": cores}),
        (f"{served.name}, n_batch 128", served, None, {"n_batch": 128, "n_ubatch": 128}),
        (f"{served.name}, n_batch 1024", served, None, {"n_batch": 1024, "n_ubatch": 1024}),
        (f"{served.name}, flash_attn", served, None, {"flash_attn": True}),
    ]
    if lora is not None and lora.is_file():
        merged = models / f"{served.stem}+{lora.parent.name}.gguf"
        configs += [(f"{served.name} + LoRA {lora.parent.name} (unmerged)", served, lora, {}),
                    (f"{served.name} with {lora.parent.name} merged in", merged if merged.is_file()
                     else merged_gguf(served, lora, merged), None, {})]
    sources = [[ContextChunk(s.text, s.title, s.source, s.page, s.section)
                for s in runtime.chain.retriever.retrieve(q)] for q in questions[:2]]
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for label, gguf, adapter, overrides in configs:
            instance = LlamaInstance(open_llama(gguf, settings, adapter, **overrides))
            llama = instance.llama
            try:
                first, second = (instance.prompt_tokens(build_messages(q, c)) for q, c in zip(questions, sources))
                llama.reset()
                started = time.perf_counter()
                llama.eval(second)
                cold = time.perf_counter() - started
                started = time.perf_counter()
                for _ in range(64):
                    llama.eval(second[-1:])
                decode = 64 / (time.perf_counter() - started)
                llama.reset()
                llama.eval(first)
                reuse = llama.longest_token_prefix(first, second)
                llama.n_tokens = reuse  # what Llama.generate does with a cached prefix
                started = time.perf_counter()
                llama.eval(second[reuse:])
                warm = time.perf_counter() - started
            finally:
                llama.close()
            figures = {"prompt": len(second), "prefill": len(second) / cold, "decode": decode,
                       "cold_s": cold, "warm_s": warm, "reused": reuse}
            kept = best.setdefault(label, figures)
            for key, better in (("prefill", max), ("decode", max), ("cold_s", min), ("warm_s", min)):
                kept[key] = better(kept[key], figures[key])
    print(f"\nllama.cpp options, best of {rounds} rounds, on the rag prompt of {questions[1]!r}")
    print("| configuration | prompt tokens | prefill tokens/s | decode tokens/s | prefill s, empty cache | "
          "prefill s, after the previous question (tokens reused) |\n|---|---|---|---|---|---|")
    for label, f in best.items():
        print(f"| {label} | {f['prompt']} | {f['prefill']:.0f} | {f['decode']:.1f} | {f['cold_s']:.2f} | "
              f"{f['warm_s']:.2f} ({f['reused']}) |", flush=True)


def _targets(rows: dict[str, dict[str, float]]) -> None:
    hybrid, rag, bare = rows.get("hybrid"), rows.get("rag"), rows.get("bare")
    print()
    if hybrid and bare and bare["tokens_per_s"]:
        print(f"hybrid decode / bare llama.cpp base decode: {hybrid['tokens_per_s'] / bare['tokens_per_s']:.2f}x (target >= 0.9x)")
    old = rows.get("transformers hybrid")
    if hybrid and old and old["tokens_per_s"]:
        print(f"hybrid decode / transformers hybrid decode: {hybrid['tokens_per_s'] / old['tokens_per_s']:.1f}x (target >= 5x)")
    for name, row in (("rag", rag), ("hybrid", hybrid)):
        if row:
            print(f"{name}: TTFT {row['ttft']:.2f} s with {row['prompt_tokens']:.0f} prompt tokens (target <= 1.0 s "
                  f"for 4 chunks); total {row['total']:.2f} s per answer (target <= 5 s)")


def _questions(args: argparse.Namespace, settings: Settings) -> list[str]:
    if args.qa:
        from core.qa import load_qa

        # A follow-up alone would be asked without its conversation: standalone questions only.
        return [r.question for r in load_qa(args.qa) if not r.followup][: args.limit]
    return settings.chat.examples[: args.limit]


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    settings = load_settings(args.settings, parse_overrides(args.overrides))
    setup_logging("WARNING")
    from chatbot.runtime import build_runtime

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: --modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
        return 2
    try:
        questions = _questions(args, settings)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # History goes to a scratch database: benchmark turns are not anyone's conversations.
    with tempfile.TemporaryDirectory() as scratch:
        settings = settings.model_copy(update={"chat": settings.chat.model_copy(update={"history_db": Path(scratch) / "bench.sqlite3"})})
        runtime = build_runtime(settings)
        try:
            if runtime.store.count() == 0:
                print("the collection is empty: run python -m ingest data/demo first")
                return 1
            print(f"{len(questions)} questions; generation {json.dumps(runtime.generation.describe())}; "
                  f"max_new_tokens={settings.llm.max_new_tokens}, k={settings.retrieval.k}")
            if args.options:
                _options(runtime, questions, args.options)
                return 0
            print(HEADER)
            rows = _chain_rows(runtime, modes, questions)
            weights = str(runtime.generation.describe()["weights"])
            if not args.no_bare and weights.endswith(".gguf") and Path(weights).is_file():
                rows["bare"] = _bare_llamacpp(runtime, questions)
            for backend in args.anchor:
                # Same index, embedder and questions; another backend (built and closed here).
                other = settings.model_copy(update={"llm": settings.llm.model_copy(update={"backend": backend})})
                anchor = build_runtime(other, store=runtime.store, embedder=runtime.embedder)
                try:
                    found = _chain_rows(anchor, [m for m in ("rag", "hybrid") if m in modes], questions, f"{backend} ")
                finally:
                    anchor.generation.close()
                rows |= {f"{backend} {mode}": row for mode, row in found.items()}
            _targets(rows)
        finally:
            runtime.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
