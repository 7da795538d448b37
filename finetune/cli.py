"""python -m finetune: training data, LoRA adapters and embedders for ragtune.

Examples:
  # the demo adapter, from scratch (index, data, 17-32 min of CPU training, a merged export)
  python -m ingest data/demo
  python -m finetune prepare --qa data/demo/qa/train.jsonl --val-qa data/demo/qa/validation.jsonl --distractors 2 --no-gold-share 0.05 --out data/finetune/demo
  python -m finetune train --config finetune/configs/demo.yaml          # -> data/adapters/demo/
  python -m finetune train --config finetune/configs/demo.yaml --resume # after a crash or Ctrl-C
  python -m finetune train --config finetune/configs/demo.yaml --set lora.rank=4 --set name=demo-r4
  python -m finetune merge demo                                         # -> data/merged/demo/
  python -m finetune export demo --gguf                                 # -> data/adapters/demo/adapter_model.gguf (llama.cpp)

  # PubMedQA: its own collection, a random validation split, everything outside the repository
  python -m ingest ../shared/data/pubmedqa/corpus.jsonl --text-field contexts --collection pubmedqa --set data_dir=/tmp/pubmedqa-run
  python -m finetune prepare --qa ../shared/data/pubmedqa/dev.jsonl --collection pubmedqa --distractors 1 --gold-chunks 3 --no-gold-share 0 --no-quotes --max-tokens 1100 --out /tmp/pubmedqa-run/finetune/pubmedqa --set data_dir=/tmp/pubmedqa-run
  python -m finetune train --config finetune/configs/pubmedqa.yaml --set data_dir=/tmp/pubmedqa-run

  # no hand-written Q/A set: a teacher writes one from the index (synth.teacher: local, or any OpenAI-compatible endpoint)
  python -m finetune synth --out data/finetune/synth --chunks 40 --max-questions 120
  python -m finetune prepare --qa data/finetune/synth/qa.jsonl --distractors 2 --no-gold-share 0.05 --out data/finetune/synth-data

  # the chat's thumbs up/down (of the users in feedback.opted_in_owners) -> an adapter trained with KTO
  python -m finetune prepare --from-feedback --out data/finetune/feedback --set 'feedback.opted_in_owners=[alice]'
  python -m finetune train --config finetune/configs/feedback.yaml                   # -> data/adapters/feedback/

  # an embedder that knows "MI" means "myocardial infarction"
  python -m finetune embeddings --qa data/demo/qa/train.jsonl --val-qa data/demo/qa/validation.jsonl --out demo-abbrev
  RAGTUNE_EMBEDDING__MODEL=data/embedders/demo-abbrev python -m ingest data/demo --reembed
  # or as a LoRA that only hybrid mode searches (a second named vector; -> data/adapters/demo-embedder/)
  python -m finetune embeddings --lora --qa data/demo/qa/train.jsonl --val-qa data/demo/qa/validation.jsonl --out demo-embedder --learning-rate 5e-4
  python -m ingest tuned-vector
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from core.hub import ModelUnavailableError
from core.logs import setup_logging
from core.settings import Settings, SettingsError, load_settings, parse_overrides
from core.store import StoreError
from finetune.files import InputError, OutputExistsError

log = logging.getLogger("finetune")

_EXAMPLES = __doc__.split("\n\n", 1)[1]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", type=Path, help="settings YAML (default ./settings.yaml if present)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set data_dir=/tmp/run (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description=__doc__.split("\n\n", 1)[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = commands.add_parser(
        "prepare", help="Q/A JSONL + the index, or the chat's thumbs up/down -> chat-format training files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python -m finetune prepare --qa data/demo/qa/train.jsonl --val-qa data/demo/qa/validation.jsonl --distractors 2 --no-gold-share 0.05 --out data/finetune/demo\n"
        "  python -m finetune prepare --qa ../shared/data/pubmedqa/dev.jsonl --collection pubmedqa --out data/finetune/pubmedqa\n"
        "  python -m finetune prepare --qa my-qa.jsonl --out data/finetune/mine --distractors 2 --no-gold-share 0.3 --kinds raft\n"
        "  # liked/disliked chat answers of the owners in feedback.opted_in_owners -> sft/, kto/, dpo/\n"
        "  python -m finetune prepare --from-feedback --out data/finetune/feedback --set 'feedback.opted_in_owners=[alice, bob]'\n"
        "  python -m finetune prepare --from-feedback --out data/finetune/feedback --set feedback.train_on=all --exclude-user tester",
    )
    source = prep.add_mutually_exclusive_group(required=True)
    source.add_argument("--qa", type=Path, help="Q/A records (JSONL): id, question, answer, ...")
    source.add_argument("--from-feedback", action="store_true",
                        help="the chat history's rated answers (chat.history_db), as SFT, KTO and DPO data; "
                        "only owners allowed by feedback.train_on / opted_in_owners / excluded_owners")
    prep.add_argument("--exclude-user", action="append", default=[], metavar="OWNER",
                      help="--from-feedback: leave this owner out (a user name, or an owner id such as "
                      "browser:ID); repeatable")
    prep.add_argument("--val-qa", type=Path, help="validation Q/A records; without it --val-share of --qa is held out")
    prep.add_argument("--out", type=Path, required=True,
                      help="output folder: sft/, raft/ (--from-feedback: sft/, kto/, dpo/) and summary.json")
    prep.add_argument("--collection", help="Qdrant collection to draw chunks from (default: qdrant.collection)")
    prep.add_argument("--kinds", default="sft,raft", help="comma-separated: sft, raft (default both)")
    prep.add_argument("--distractors", type=int, metavar="K",
                      help="distractor chunks per example (default retrieval.k - 1: as many chunks as the chat gets)")
    prep.add_argument("--gold-chunks", type=int, default=1, metavar="N",
                      help="chunks of the gold document each RAFT example shows, its best-ranked first (default 1; "
                           "PubMedQA: 3, the abstract's results as well as its background)")
    prep.add_argument("--no-gold-share", type=float, default=0.2, metavar="P",
                      help="share of answerable RAFT examples without the gold chunk, target NOT_COVERED (default 0.2; "
                           "a small model over-learns the refusal: the demo uses 0.05, see docs/finetune.md)")
    prep.add_argument("--val-share", type=float, default=0.1, help="validation share without --val-qa (default 0.1)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffles (default 0)")
    prep.add_argument("--followups", choices=["with-history", "skip"], default="with-history",
                      help="follow-up turns: keep, with earlier turns as chat history (default), or skip")
    prep.add_argument("--max-tokens", type=int, help="longest example allowed (default llm.context_window)")
    prep.add_argument("--no-raft-unanswerable", action="store_true",
                      help="no RAFT examples for unanswerable records: the chat's calibrated decline "
                           "(retrieval.decline) says 'not covered', so the adapter always answers (the demo)")
    prep.add_argument("--no-quotes", action="store_true",
                      help="RAFT prompts show whole chunks and targets do not quote (the pre-evidence format)")
    prep.add_argument("--force", action="store_true", help="replace --out if it exists")
    _common(prep)

    synth = commands.add_parser(
        "synth", help="a teacher model writes Q/A records from the collection's chunks -> OUT/qa.jsonl (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  # the local generation backend as the teacher (the packaged 135M model: weak, but it runs anywhere)\n"
        "  python -m finetune synth --out data/finetune/synth --chunks 40 --max-questions 120\n"
        "  python -m finetune synth --out data/finetune/synth --chunks 40 --max-questions 120   # again: resumes\n"
        "  # a team's vLLM serving a 70B model\n"
        "  python -m finetune synth --out data/finetune/synth --set synth.teacher.backend=openai \\\n"
        "      --set synth.teacher.base_url=http://vllm:8000/v1 --set synth.teacher.model=meta-llama/Llama-3.3-70B-Instruct\n"
        "  # llama-cpp-python's server: JSON held to the schema by a grammar\n"
        "  python -m finetune synth --out /tmp/synth --set synth.teacher.backend=openai --set synth.teacher.base_url=http://127.0.0.1:8000/v1 \\\n"
        "      --set synth.teacher.model=smollm2 --set synth.teacher.response_format=json_object --max-tokens 20000\n"
        "then: python -m finetune prepare --qa OUT/qa.jsonl --out data/finetune/synth-data ...\n"
        "Settings: synth.kinds, synth.top_k, synth.hard (apart | keep | drop), synth.duplicate_similarity, synth.teacher.*.\n"
        "Exit status: 0 done; 1 done, but some teacher calls failed (listed; rerun the same command to retry them);\n"
        "2 unusable input or settings.",
    )
    synth.add_argument("--out", type=Path, required=True,
                       help="output folder: qa.jsonl, hard.jsonl, filters.json, summary.json, journal.jsonl; "
                       "an existing one is resumed")
    synth.add_argument("--collection", help="Qdrant collection to sample chunks from (default: qdrant.collection)")
    synth.add_argument("--chunks", type=int, metavar="N", help="chunks to sample, in seeded order (default: all)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the chunk order (default 0)")
    synth.add_argument("--max-questions", type=int, metavar="N", help="stop once N records are kept (qa + hard)")
    synth.add_argument("--max-tokens", type=int, metavar="N", help="stop once the teacher has generated N tokens")
    _common(synth)

    train = commands.add_parser(
        "train", help="LoRA-train the chat model on prepared data -> <data_dir>/adapters/NAME/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python -m finetune train --config finetune/configs/demo.yaml\n"
        "  python -m finetune train --config finetune/configs/demo.yaml --resume\n"
        "  python -m finetune train --config finetune/configs/demo.yaml --set lora.rank=8 --set max_steps=20 --set name=try --force\n"
        "--set takes training keys (name, train_files, lora.rank, learning_rate, epochs, max_steps, batch_size,\n"
        "gradient_accumulation, max_length, seed, ...) and settings keys (data_dir, llm.model, ...).",
    )
    train.add_argument("--config", type=Path, required=True, help="training YAML (see finetune/configs/)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this adapter")
    train.add_argument("--force", action="store_true",
                       help="replace an existing adapter of this name, and discard checkpoints of an unfinished run")
    _common(train)

    merge = commands.add_parser(
        "merge", help="fold an adapter into the base model -> a folder plain transformers loads",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python -m finetune merge demo                      # -> data/merged/demo/\n"
        "  python -m finetune merge /tmp/pubmedqa-run/adapters/pubmedqa --out /tmp/pubmedqa-merged",
    )
    merge.add_argument("adapter", help="adapter name under <data_dir>/adapters, or its folder")
    merge.add_argument("--out", type=Path, help="output folder (default <data_dir>/merged/NAME)")
    merge.add_argument("--force", action="store_true", help="replace --out if it exists")
    _common(merge)

    export = commands.add_parser(
        "export", help="the adapter as a llama.cpp LoRA GGUF (llm.backend=llamacpp), checked: served = trained",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python -m finetune export demo --gguf               # -> data/adapters/demo/adapter_model.gguf\n"
        "  python -m finetune export demo --gguf --force --check-prompts 32\n"
        "  python -m finetune export /tmp/pubmedqa-run/adapters/pubmedqa --gguf --set llm.gguf=/models/base-f16.gguf\n"
        "The export is kept only if llama.cpp with it and transformers + PEFT give the same greedy first 32\n"
        "tokens on >= 90% of the adapter's validation prompts, with and without the adapter (finetune/gguf.py).",
    )
    export.add_argument("adapter", help="adapter name under <data_dir>/adapters, or its folder")
    export.add_argument("--gguf", action="store_true", required=True,
                        help="write a llama.cpp LoRA GGUF (the one export format; a merged transformers folder is 'merge')")
    export.add_argument("--out", type=Path, help="output file (default ADAPTER/adapter_model.gguf)")
    export.add_argument("--dtype", choices=["f16", "f32"], default="f16", help="LoRA tensor type (default f16)")
    export.add_argument("--check-prompts", type=int, default=16, metavar="N",
                        help="prompts the served = trained check compares (default 16)")
    export.add_argument("--force", action="store_true", help="replace the output if it exists")
    _common(export)

    emb = commands.add_parser(
        "embeddings", help="fine-tune the embedder on (question, gold chunk) pairs -> <data_dir>/embedders/NAME/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python -m finetune embeddings --qa data/demo/qa/train.jsonl --val-qa data/demo/qa/validation.jsonl --out demo-abbrev\n"
        "  python -m finetune embeddings --qa ../shared/data/pubmedqa/dev.jsonl --collection pubmedqa --out pubmedqa --epochs 1\n"
        "then re-embed the collection with it:\n"
        "  RAGTUNE_EMBEDDING__MODEL=data/embedders/demo-abbrev python -m ingest data/demo --reembed\n"
        "a LoRA for hybrid mode's second vector (the committed data/adapters/demo-embedder):\n"
        "  python -m finetune embeddings --lora --qa data/demo/qa/train.jsonl --val-qa data/demo/qa/validation.jsonl --out demo-embedder --learning-rate 5e-4\n"
        "  python -m ingest tuned-vector --set retrieval.tuned_embedder=demo-embedder   # adds its vectors to the index",
    )
    emb.add_argument("--qa", type=Path, required=True, help="Q/A records (JSONL) with gold documents")
    emb.add_argument("--val-qa", type=Path, help="held-out Q/A records for recall@k; default: --val-share of --qa")
    emb.add_argument("--out", required=True, metavar="NAME", help="embedder name, saved to <data_dir>/embedders/NAME")
    emb.add_argument("--collection", help="Qdrant collection holding the gold chunks (default: qdrant.collection)")
    emb.add_argument("--glossary", type=Path, action="append",
                     help="abbreviation glossary (.md lines '- **MI** - myocardial infarction', or .csv "
                     "abbreviation,expansion); a folder takes all of them; repeatable "
                     "(default: data/demo/glossary if present, else a small built-in table)")
    emb.add_argument("--epochs", type=float, default=3.0, help="training epochs (default 3)")
    emb.add_argument("--batch-size", type=int, default=16, help="pairs per batch; the others are its negatives (default 16)")
    emb.add_argument("--learning-rate", type=float, default=2e-5, help="(default 2e-5)")
    emb.add_argument("--val-share", type=float, default=0.2, help="held-out share without --val-qa (default 0.2)")
    emb.add_argument("--seed", type=int, default=0)
    emb.add_argument("--k", default="1,3,5", help="recall@k cut-offs (default 1,3,5)")
    emb.add_argument("--lora", action="store_true",
                     help="train a LoRA (PEFT) instead of the whole model: a few MB in <data_dir>/adapters/NAME, "
                     "used as retrieval.tuned_embedder (hybrid mode searches its vectors; rag keeps the base's)")
    emb.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    emb.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32)")
    emb.add_argument("--force", action="store_true", help="replace the embedder if it exists")
    _common(emb)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = parse_overrides(args.overrides)
    if getattr(args, "collection", None):
        overrides.setdefault("qdrant", {})["collection"] = args.collection
    return load_settings(args.settings, overrides)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        if args.command == "train":
            return _train(args)
        settings = _settings(args)
        setup_logging(settings.log_level)
        if args.command == "prepare":
            return _prepare(args, settings, progress)
        if args.command == "synth":
            return _synth(args, settings, progress)
        if args.command == "merge":
            return _merge(args, settings)
        if args.command == "export":
            return _export(args, settings)
        return _embeddings(args, settings, progress)
    except (SettingsError, InputError, OutputExistsError, ModelUnavailableError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written (training keeps its checkpoints: rerun with --resume)",
              file=sys.stderr)
        return 130


def _prepare(args: argparse.Namespace, settings: Settings, progress: bool) -> int:
    from pydantic import ValidationError

    if args.from_feedback:
        return _prepare_feedback(args, settings)
    if args.exclude_user:
        raise InputError("--exclude-user applies to --from-feedback only")
    from finetune.data import PrepareOptions, format_summary, prepare

    try:
        options = PrepareOptions(
            kinds=[k.strip() for k in args.kinds.split(",") if k.strip()],
            distractors=args.distractors, no_gold_share=args.no_gold_share, val_share=args.val_share,
            seed=args.seed, followups=args.followups, max_tokens=args.max_tokens,
            raft_unanswerable=not args.no_raft_unanswerable, quotes=not args.no_quotes,
            gold_chunks=args.gold_chunks,
        )
    except ValidationError as exc:
        raise InputError("; ".join(f"--{'-'.join(str(p) for p in e['loc'])}: {e['msg']}".replace("_", "-")
                                   for e in exc.errors())) from None
    result = prepare(settings, args.qa, args.out, options, val_qa_path=args.val_qa, force=args.force,
                     progress=progress)
    print(format_summary(result.summary))
    print(f"wrote {result.out} (summary in {result.out / 'summary.json'})", file=sys.stderr)
    return 0


def _prepare_feedback(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from finetune.feedback import FeedbackOptions, format_feedback_summary, prepare_feedback

    ignored = [flag for flag, given in (("--val-qa", args.val_qa), ("--collection", args.collection),
                                        ("--distractors", args.distractors is not None)) if given]
    if ignored:
        raise InputError(f"{', '.join(ignored)}: not used with --from-feedback (the chunks are the ones each answer was given)")
    try:
        options = FeedbackOptions(val_share=args.val_share, seed=args.seed, exclude_owners=args.exclude_user,
                                  max_tokens=args.max_tokens)
    except ValidationError as exc:
        raise InputError("; ".join(f"--{'-'.join(str(p) for p in e['loc'])}: {e['msg']}".replace("_", "-")
                                   for e in exc.errors())) from None
    result = prepare_feedback(settings, args.out, options, force=args.force)
    print(format_feedback_summary(result.summary))
    print(f"wrote {result.out} (summary in {result.out / 'summary.json'})", file=sys.stderr)
    return 0


def _synth(args: argparse.Namespace, settings: Settings, progress: bool) -> int:
    from pydantic import ValidationError

    from finetune.synth import FILTERS_FILE, QA_FILE, SynthOptions, format_table, synthesize

    try:
        options = SynthOptions(chunks=args.chunks, seed=args.seed, max_questions=args.max_questions,
                               max_tokens=args.max_tokens)
    except ValidationError as exc:
        raise InputError("; ".join(f"--{'-'.join(str(p) for p in e['loc'])}: {e['msg']}".replace("_", "-")
                                   for e in exc.errors())) from None
    result = synthesize(settings, args.out, options, progress=progress)
    print(format_table(result.summary))
    print(f"wrote {result.out / QA_FILE} (filter table in {result.out / FILTERS_FILE})", file=sys.stderr)
    if result.failures:
        print(f"{len(result.failures)} teacher call(s) failed and were counted; rerun the same command to retry them:",
              file=sys.stderr)
        for line in result.failures[:10]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    from finetune.config import load_train_config, split_overrides
    from finetune.train import train

    config_overrides, settings_overrides = split_overrides(parse_overrides(args.overrides))
    config = load_train_config(args.config, config_overrides)
    settings = load_settings(args.settings, settings_overrides)
    setup_logging(settings.log_level)
    result = train(config, settings, resume=args.resume, force=args.force,
                   progress=not args.no_progress)
    metrics = result.metrics
    print(json.dumps({k: metrics[k] for k in (
        "base_val_loss", "adapter_val_loss", "train_loss", "tokens_per_s", "train_wall_s", "adapter_mb",
    ) if k in metrics}, indent=2))
    print(f"wrote {result.adapter_dir}", file=sys.stderr)
    if not metrics["gguf_export"]["ok"]:
        print(f"error: no llama.cpp export (llm.backend=llamacpp cannot serve it; transformers can): "
              f"{metrics['gguf_export']['problem']}", file=sys.stderr)
        return 1
    if not metrics["generation_check"]["ok"]:
        print(f"error: the adapter failed its generation check: {metrics['generation_check']['problem']}",
              file=sys.stderr)
        return 1
    return 0


def _merge(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.export import merge_adapter

    result = merge_adapter(settings, args.adapter, args.out, force=args.force)
    print(f"wrote {result.out} (max |logit difference| vs the adapter: {result.max_logit_diff:.2e})",
          file=sys.stderr)
    return 0


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.gguf import export_gguf

    result = export_gguf(settings, args.adapter, args.out, force=args.force, dtype=args.dtype,
                         check_limit=args.check_prompts)
    print(json.dumps(result.as_dict()["check"], indent=2, ensure_ascii=False))
    print(f"wrote {result.out} ({result.bytes / 2**20:.1f} MB, {result.tensors} tensors, rank {result.rank}): "
          f"{result.check.summary()}", file=sys.stderr)
    return 0


def _embeddings(args: argparse.Namespace, settings: Settings, progress: bool) -> int:
    from finetune.embeddings import EmbeddingOptions, format_report, train_embedder

    options = EmbeddingOptions(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        val_share=args.val_share, seed=args.seed, k=[int(x) for x in args.k.split(",") if x.strip()],
        lora=args.lora, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
    )
    glossaries = args.glossary
    if glossaries is None:
        default = Path("data/demo/glossary")
        glossaries = [default] if default.is_dir() else []
    result = train_embedder(settings, args.qa, args.out, options, val_qa_path=args.val_qa,
                            glossaries=glossaries, force=args.force, progress=progress)
    print(format_report(result.metrics))
    if args.lora:
        print(f"wrote {result.out}; add its vectors to the index with: python -m ingest tuned-vector "
              f"--set retrieval.tuned_embedder={result.out}", file=sys.stderr)
    else:
        print(f"wrote {result.out}; use it with: RAGTUNE_EMBEDDING__MODEL={result.out} python -m ingest PATH... --reembed",
              file=sys.stderr)
    return 0
