"""python -m evals: compare base, RAG, fine-tuned and hybrid answers on a question set.

Examples:
  python -m ingest data/demo
  python -m evals --qa data/demo/qa/test.jsonl --modes base,rag --out /tmp/evals-demo
  python -m evals --qa data/demo/qa/test.jsonl --adapter demo --out /tmp/evals-demo-all          # all four modes
  python -m evals --qa data/demo/qa/test.jsonl --adapter demo --out /tmp/evals-demo-all --resume # after Ctrl-C
  python -m evals --qa data/demo/qa/test.jsonl --modes rag --limit 5 --out /tmp/evals-quick --set llm.max_new_tokens=64
  python -m evals --qa data/demo/qa/test.jsonl --modes base,rag --out /tmp/evals-demo --report-only  # report again

  # PubMedQA: its corpus in its own collection; evaluate on the questions the adapter did not see
  python -m ingest ../shared/data/pubmedqa/corpus.jsonl --text-field contexts --collection pubmedqa
  python -m evals --qa ../shared/data/pubmedqa/dev.jsonl --collection pubmedqa --modes base,rag \\
      --exclude-ids /tmp/pubmedqa-run/finetune/pubmedqa/sft/train.jsonl --out /tmp/evals-pubmedqa

Writes OUT/records.jsonl (one line per answered question, flushed as it is written),
OUT/report.md (the table and the configuration), OUT/results.json (configuration, summary and
every record) and OUT/metrics.png. Exit status: 0 done, 1 done but malformed question records
were skipped (listed on stderr and in the report), 2 unusable input or settings, 130 interrupted
(the records so far are kept: rerun with --resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.hub import ModelUnavailableError
from core.jsonl import InputError
from core.logs import setup_logging
from core.modes import ADAPTED_MODES, MODES, RETRIEVING_MODES
from core.settings import Settings, SettingsError, load_settings, parse_overrides
from core.store import StoreError
from evals.labels import LabelPriorError, adapter_label_prior

if TYPE_CHECKING:
    from chatbot.runtime import Runtime
    from evals.questions import EvalQuestion, QuestionSet

DEFAULT_MODES = "base,rag,finetuned,hybrid,extractive"  # extractive: the no-generation baseline
RECORDS_FILE = "records.jsonl"
RUN_FILE = "run.json"
HISTORY_FILE = "chat.sqlite3"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evals",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--qa", type=Path, required=True, help="question set (JSONL): the demo's format or PubMedQA's")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help=f"comma-separated, in the report's column order (default {DEFAULT_MODES})")
    parser.add_argument("--adapter", help="LoRA adapter for hybrid/finetuned: a folder or a name under data/adapters "
                                          "(default llm.adapter)")
    parser.add_argument("--collection", help="Qdrant collection to retrieve from (default qdrant.collection)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions (quick runs)")
    parser.add_argument("--ids", type=Path, metavar="FILE",
                        help="evaluate only these question ids (JSONL with an 'id' field, or one id per line)")
    parser.add_argument("--exclude-ids", type=Path, metavar="FILE",
                        help="leave these question ids out, e.g. the adapter's training split")
    parser.add_argument("--out", type=Path, help="output folder (default <data_dir>/evals/<question set name>)")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out: skip what is recorded")
    parser.add_argument("--force", action="store_true", help="discard the records already in --out and start over")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the records in --out (re-scored); ask nothing, load no model")
    parser.add_argument("--seed", type=int, default=0, help="seed set before every question (default 0)")
    parser.add_argument("--settings", type=Path, help="settings YAML (default ./settings.yaml if present)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override a setting, e.g. --set llm.max_new_tokens=64 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_fingerprint(folder: Path) -> str:
    """sha256 over the adapter's config and weights (names and bytes): which adapter it was."""
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and (file.name == "adapter_config.json" or file.suffix in (".safetensors", ".bin")):
            digest.update(file.name.encode())
            digest.update(_sha256(file).encode())
    return digest.hexdigest()[:16]


def _settings(args: argparse.Namespace) -> Settings:
    overrides = parse_overrides(args.overrides)
    # Greedy decoding unless asked otherwise: the same inputs must give the same answers.
    overrides.setdefault("llm", {}).setdefault("temperature", 0.0)
    if args.adapter:
        overrides["llm"]["adapter"] = args.adapter
    if args.collection:
        overrides.setdefault("qdrant", {})["collection"] = args.collection
    return load_settings(args.settings, overrides)


def _modes(text: str) -> list[str]:
    from evals.runner import EXTRACTIVE

    modes = [m.strip() for m in text.split(",") if m.strip()]
    known = (*MODES, EXTRACTIVE)
    unknown = [m for m in modes if m not in known]
    if unknown or not modes:
        raise SettingsError(f"--modes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return list(dict.fromkeys(modes))


def _adapter_description(adapter: str | None) -> dict[str, str] | None:
    """The backend's adapter: a folder (with its fingerprint), or the name a server serves it by."""
    if not adapter:
        return None
    if Path(adapter).is_dir():
        return {"path": adapter, "fingerprint": adapter_fingerprint(Path(adapter))}
    return {"path": adapter}


def describe_run(args: argparse.Namespace, argv: list[str], runtime: "Runtime", qa: "QuestionSet",
                 questions: list["EvalQuestion"], modes: list[str]) -> dict[str, Any]:
    from evals.metrics import RECALL_AT

    settings = runtime.settings
    backend = runtime.generation.describe()
    filters = (("--ids", args.ids), ("--exclude-ids", args.exclude_ids))
    selection = ", ".join(f"{flag} {path}" for flag, path in filters if path)
    return {
        "command": "python -m evals " + shlex.join(argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "question_set": {
            "path": str(qa.path), "sha256": _sha256(qa.path), "lines": qa.lines, "malformed": len(qa.problems),
            "types": dict(Counter(q.type or "untyped" for q in questions)),
        },
        "questions": len(questions),
        "selection": selection or None,
        "limit": args.limit,
        "modes": modes,
        "recorded_modes": modes,  # every mode this folder holds records of, across resumes
        "seed": args.seed,
        # What answered: a resumed run must use the same backend and weights (records of
        # llama.cpp and of transformers differ, however close), so these are compared on --resume.
        "llm": {
            "backend": settings.llm.backend, "model": settings.llm.model,
            "weights": backend["weights"],
            "max_new_tokens": settings.llm.max_new_tokens,
            "temperature": settings.llm.temperature, "repetition_penalty": settings.llm.repetition_penalty,
            "context_window": settings.llm.context_window,
        },
        "generation": backend,  # threads, batch size...: recorded, not compared
        "adapter": _adapter_description(backend.get("adapter")),
        # Its yes/no/maybe offsets (evals/labels.py), applied to the adapted modes' likelihood labels.
        "label_prior": adapter_label_prior(backend.get("adapter")),
        "embedder": runtime.embedder.info.name,
        # What each retrieving mode searched: hybrid the tuned embedder's vector when it was ready.
        "mode_vectors": {mode: {"vector": r.settings.vector, "embedder": r.embedder.info.name}
                         for mode, r in runtime.chain.retrievers.items()},
        "collection": {"name": settings.qdrant.collection, "points": runtime.store.count()},
        "retrieval": settings.retrieval.model_dump() | {"recall_k": max(RECALL_AT)},
        "condense": settings.chat.condense,
        "condense_turns": settings.chat.condense_turns,
        "attribute_citations": settings.chat.attribute_citations,
    }


# What must not change between a run and its --resume (modes, limit and selection may).
_RESUME_KEYS = ("question_set.sha256", "seed", "llm", "adapter", "embedder", "mode_vectors", "collection.name", "retrieval",
                "condense", "condense_turns", "attribute_citations")


_RETRIEVAL_KEYS = ("embedder", "mode_vectors", "collection.name", "retrieval", "condense", "condense_turns",
                   "attribute_citations")


def _pick(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = (value or {}).get(part)
    return value


def resume_mismatch(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ and matter for the records already made.

    The adapter matters only once adapter modes were recorded: adding hybrid and finetuned to a
    finished base + rag run is a resume, not a new run.
    """
    from evals.runner import EXTRACTIVE

    keys = list(_RESUME_KEYS)
    recorded = set(previous.get("recorded_modes", previous.get("modes", [])))
    if not recorded & set(ADAPTED_MODES):
        keys.remove("adapter")
    if not recorded & {*RETRIEVING_MODES, EXTRACTIVE}:
        # Only base and finetuned were recorded: they read no chunk, so retrieval, evidence
        # and embedder settings changed since cannot have touched their records.
        keys = [k for k in keys if k not in _RETRIEVAL_KEYS]
    return [key for key in keys if _pick(previous, key) != _pick(current, key)]


def _prepare_out(out: Path, resume: bool, force: bool) -> str | None:
    """Make the output folder ready; an error message when it holds a run and neither flag says what to do."""
    out.mkdir(parents=True, exist_ok=True)
    records = out / RECORDS_FILE
    if records.is_file() and records.stat().st_size and not (resume or force):
        return (f"{out} already holds the records of a run; --resume continues it, --force starts over, "
                "or choose another --out")
    if force and not resume:
        for name in (RECORDS_FILE, RUN_FILE, HISTORY_FILE, f"{HISTORY_FILE}-wal", f"{HISTORY_FILE}-shm"):
            (out / name).unlink(missing_ok=True)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    try:
        settings = _settings(args)
        modes = _modes(args.modes)
    except SettingsError as exc:
        return _fail(str(exc))
    if args.limit is not None and args.limit < 1:
        return _fail("--limit must be at least 1")
    setup_logging(settings.log_level)

    from evals.questions import load_questions, read_ids, select

    try:
        qa = load_questions(args.qa)
        only = read_ids(args.ids) if args.ids else None
        exclude = read_ids(args.exclude_ids) if args.exclude_ids else None
    except InputError as exc:
        return _fail(str(exc))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _fail(f"cannot read the question set or an id file: {exc}")
    for problem in qa.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    questions = select(qa.questions, only=only, exclude=exclude, limit=args.limit)
    if not questions:
        return _fail(f"{args.qa}: no questions to evaluate "
                     f"({len(qa.problems)} malformed, after --ids/--exclude-ids/--limit)")

    out = args.out or settings.data_dir / "evals" / args.qa.stem
    problem = None if args.report_only else _prepare_out(out, args.resume, args.force)
    if problem:
        return _fail(problem)
    # The evaluation's conversations live beside its records, not in anyone's chat history.
    settings = settings.model_copy(update={"chat": settings.chat.model_copy(update={"history_db": out / HISTORY_FILE})})

    if args.report_only:
        status = _report_only(out, questions, modes, [f"skipped question record: {p}" for p in qa.problems])
        return status or (1 if qa.problems else 0)

    from chatbot.runtime import build_runtime
    from evals.records import RecordLog
    from evals.runner import Evaluator

    try:
        runtime = build_runtime(settings)
    except (StoreError, ModelUnavailableError) as exc:
        return _fail(str(exc))
    try:
        if runtime.store.count() == 0 and any(m in ("rag", "hybrid", "extractive") for m in modes):
            return _fail(f"the collection {settings.qdrant.collection!r} is empty: index the documents first "
                         f"(python -m ingest data/demo, or the PubMedQA corpus with --collection)")
        notes = [f"skipped question record: {p}" for p in qa.problems]
        active = []
        for mode in modes:
            if mode in ADAPTED_MODES and not runtime.chain.models.has_adapter:
                notes.append(f"mode {mode} skipped: no adapter configured (--adapter NAME or llm.adapter)")
                print(f"note: {notes[-1]}", file=sys.stderr)
            else:
                active.append(mode)
        if not active:
            return _fail("no mode can run: " + "; ".join(notes))
        try:
            config = describe_run(args, argv, runtime, qa, questions, active)
        except LabelPriorError as exc:
            return _fail(str(exc))
        run_file = out / RUN_FILE
        if args.resume and run_file.is_file():
            previous = json.loads(run_file.read_text(encoding="utf-8"))
            mismatch = resume_mismatch(previous, config)
            if mismatch:
                return _fail(f"--resume: the run in {out} used other settings ({', '.join(mismatch)}); "
                             "use --force to start over, or another --out")
            # The report names the command that started the run, and when it was resumed.
            config |= {"command": previous.get("command", config["command"]),
                       "started": previous.get("started", config["started"]),
                       "resumed": [*previous.get("resumed", []), config["started"]]}
            config["recorded_modes"] = list(dict.fromkeys(
                [*previous.get("recorded_modes", previous.get("modes", [])), *config["recorded_modes"]]))
        run_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

        records = RecordLog(out / RECORDS_FILE).load()
        evaluator = Evaluator(runtime, records, seed=args.seed)
        try:
            evaluator.run(questions, active, progress=not args.no_progress and sys.stderr.isatty())
        except KeyboardInterrupt:
            print(f"interrupted: {len(records.records)} records kept in {out / RECORDS_FILE}; "
                  f"rerun the same command with --resume to continue", file=sys.stderr)
            return 130
        except Exception:
            print(f"failed: {len(records.records)} records kept in {out / RECORDS_FILE}; "
                  f"after fixing the cause below, rerun the same command with --resume", file=sys.stderr)
            raise

        _report(out, config, records.records, questions, active, notes)
    finally:
        runtime.close()
    return 1 if qa.problems else 0


def _report(out: Path, config: dict[str, Any], records: list[dict[str, Any]], questions: list["EvalQuestion"],
            modes: list[str], notes: list[str]) -> None:
    """Re-score the selected questions' records (current metric definitions) and write the outputs."""
    from evals.metrics import score_record
    from evals.report import write_outputs

    order = {q.id: i for i, q in enumerate(questions)}
    kept = sorted((r for r in records if r["mode"] in modes and r["id"] in order),
                  key=lambda r: (modes.index(r["mode"]), order[r["id"]]))
    for record in kept:
        record["scores"] = score_record(record)
    written = write_outputs(out, config, kept, modes, notes)
    print((out / "report.md").read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in written.values()) + f", {out / RECORDS_FILE}", file=sys.stderr)


def _report_only(out: Path, questions: list["EvalQuestion"], modes: list[str], notes: list[str]) -> int:
    """The report of the records already in ``out``: no model, no Qdrant (which may be in use)."""
    from evals.records import RecordLog

    run_file = out / RUN_FILE
    if not run_file.is_file():
        return _fail(f"--report-only: {out} holds no run ({RUN_FILE} is missing)")
    records = RecordLog(out / RECORDS_FILE).load().records
    recorded = {r["mode"] for r in records}
    modes = [m for m in modes if m in recorded]
    if not modes:
        return _fail(f"--report-only: {out} holds no records of the modes asked for")
    config = json.loads(run_file.read_text(encoding="utf-8"))
    answered = {r["id"] for r in records if r["mode"] in modes}
    questions = [q for q in questions if q.id in answered]
    config["modes"], config["questions"] = modes, len(questions)
    config["question_set"]["types"] = dict(Counter(q.type or "untyped" for q in questions))
    _report(out, config, records, questions, modes, notes)
    return 0
