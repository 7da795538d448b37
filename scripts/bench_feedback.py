"""Benchmark: what learning from the chat's thumbs costs here, beside SFT on the same answers.

Usage (from the repository root; minutes on 2 cores, everything under --out):

    .venv/bin/python scripts/bench_feedback.py [--questions 60] [--steps 6] [--out /tmp/bench-feedback]

It fills a chat history (a real ``chatbot.memory.ChatMemory``) from the demo's training Q/A set:
each question asked in two conversations in 'finetuned' mode, answered once with its reference
answer (liked) and once with the next question's answer (disliked). The history is synthetic
(nobody chatted), but its rows are what the chat stores, so ``prepare --from-feedback`` and
``train`` do exactly what they do on a real one. Then it runs, through the command line:

    python -m finetune prepare --from-feedback ...      (timed)
    python -m finetune train  objective sft on sft/, kto on kto/, dpo on dpo/, --steps steps each

with the same batch size, and prints one table: seconds per optimiser step and tokens per second
of each objective beside SFT's, from each run's metrics.json, in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chatbot.memory import ChatMemory  # noqa: E402
from finetune.cli import main as finetune  # noqa: E402

OWNER = "user:bench"


def fill_history(db: Path, questions: int) -> int:
    records = [json.loads(line) for line in (REPO / "data" / "demo" / "qa" / "train.jsonl").read_text().splitlines()]
    records = [r for r in records if r["type"] not in ("followup", "unanswerable")][: questions + 1]
    memory = ChatMemory(db)
    rated = 0
    for record, other in zip(records, records[1:]):
        for answer, feedback in ((record["answer"], 1), (other["answer"], -1)):
            conversation = memory.create(OWNER)
            memory.append(OWNER, conversation, "user", record["question"], mode="finetuned")
            message = memory.append(OWNER, conversation, "assistant", answer, mode="finetuned")
            memory.set_feedback(OWNER, message, feedback)
            rated += 1
    return rated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--questions", type=int, default=60, help="demo questions, two rated answers each (default 60)")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per objective (default 6)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step, every objective (default 4)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-feedback"))
    args = parser.parse_args(argv)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    db = out / "chat.sqlite3"
    db.unlink(missing_ok=True)
    rated = fill_history(db, args.questions)
    settings = out / "settings.yaml"
    settings.write_text(f"data_dir: {out / 'data'}\nchat: {{history_db: {db}}}\n"
                        f"feedback: {{opted_in_owners: ['{OWNER}']}}\n")
    common = ["--settings", str(settings), "--no-progress"]
    data = out / "data" / "finetune" / "feedback"
    started = time.perf_counter()
    if finetune(["prepare", "--from-feedback", "--out", str(data), "--force", *common]) != 0:
        return 1
    prepare_s = time.perf_counter() - started

    results = {}
    for objective in ("sft", "kto", "dpo"):
        config = out / f"{objective}.yaml"
        config.write_text(
            f"name: bench-{objective}\nobjective: {objective}\n"
            f"train_files: [{data / objective / 'train.jsonl'}]\nvalidation_files: [{data / objective / 'validation.jsonl'}]\n"
            f"lora: {{rank: 8, alpha: 16, dropout: 0.05}}\nlearning_rate: 5.0e-5\nbatch_size: {args.batch_size}\n"
            f"gradient_accumulation: 1\neval_batch_size: 4\ngroup_by_length: false\nmax_steps: {args.steps}\n"
            "save_steps: 1000\nlogging_steps: 1\ncheck_examples: 1\nmax_length: 2048\n")
        finetune(["train", "--config", str(config), "--force", *common])  # exit 1 = the EOS check; timings stand
        metrics = json.loads((out / "data" / "adapters" / f"bench-{objective}" / "metrics.json").read_text())
        results[objective] = metrics

    sft = results["sft"]
    print(f"\n{rated} rated answers; prepare --from-feedback: {prepare_s:.1f} s "
          f"(sft {sft['train_examples']} train examples, kto {results['kto']['train_examples']}, "
          f"dpo {results['dpo']['train_examples']} pairs); {args.steps} steps of {args.batch_size} each\n")
    print("| objective | s per step | x SFT | tokens/s | whole command, s |")
    print("|---|---:|---:|---:|---:|")
    def per_step(metrics: dict) -> float:  # training only: the validation passes inside train() are not steps
        return (metrics["train_wall_s"] - metrics["eval_in_training_s"]) / max(metrics["steps"], 1)

    for objective, metrics in results.items():
        ratio = per_step(metrics) / per_step(sft)
        print(f"| {objective} | {per_step(metrics):.2f} | {ratio:.2f} | {metrics['tokens_per_s']} | {metrics['total_wall_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
