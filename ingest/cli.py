"""python -m ingest: keep the store's collection in step with folders of documents.

Examples:
  python -m ingest data/demo                      # index the demo knowledge base
  python -m ingest data/demo                      # again: every document unchanged, nothing embedded
  python -m ingest data/demo --prune              # also remove documents whose files are gone
  python -m ingest data/demo --dry-run            # show what would be added, changed, removed
  python -m ingest ../shared/data/pubmedqa/corpus.jsonl --text-field contexts --collection pubmedqa
  RAGTUNE_EMBEDDING__MODEL=./my-embedder python -m ingest data/demo --reembed
  python -m ingest migrate                        # move an index made by qdrant-client local mode
                                                  # into the embedded store (python -m ingest migrate --help)
  python -m ingest tuned-vector                   # give every stored chunk retrieval.tuned_embedder's vector
                                                  # (hybrid mode's), without re-embedding the base vector
  python -m ingest tuned-vector --set retrieval.tuned_embedder=data/adapters/demo-embedder --collection docs

With retrieval.tuned_embedder set (settings.yaml: the committed demo-embedder LoRA), every run
also writes each new chunk's tuned vector, and first fills it in for the chunks already stored
when the collection lacks it or it was made by another adapter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.hub import ModelUnavailableError
from core.logs import setup_logging
from core.settings import SettingsError, load_settings, parse_overrides
from core.store import StoreError

if TYPE_CHECKING:
    from core.settings import Settings
    from core.store import Store
    from ingest.indexer import Indexer

log = logging.getLogger("ingest")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders to index")
    parser.add_argument("--collection", help="collection (default: qdrant.collection)")
    parser.add_argument("--prune", action="store_true", help="remove documents whose files are gone")
    parser.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    parser.add_argument("--reembed", action="store_true",
                        help="rebuild the collection with the configured embedder (after changing embedding.model)")
    parser.add_argument("--text-field", help="JSONL: field holding the text (a list is joined); default ingest.jsonl_text_field")
    parser.add_argument("--id-field", help="JSONL: field holding the record id; default ingest.jsonl_id_field")
    parser.add_argument("--title-field", help="JSONL: field holding the title; default ingest.jsonl_title_field")
    parser.add_argument("--settings", type=Path, help="settings YAML (default ./settings.yaml if present)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override a setting, e.g. --set ingest.chunk_tokens=128 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["migrate"]:  # a folder named migrate: python -m ingest ./migrate
        from ingest.migrate import main as migrate

        return migrate(argv[1:])
    tuned_only = argv[:1] == ["tuned-vector"]  # a folder of that name: python -m ingest ./tuned-vector
    if tuned_only:
        argv = [".", *argv[1:]]  # no paths are read: the chunks' stored text is embedded
    args = make_parser().parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.collection:
        overrides.setdefault("qdrant", {})["collection"] = args.collection
    for option, key in (("text_field", "jsonl_text_field"), ("id_field", "jsonl_id_field"), ("title_field", "jsonl_title_field")):
        if getattr(args, option):
            overrides.setdefault("ingest", {})[key] = getattr(args, option)
    try:
        settings = load_settings(args.settings, overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)

    from core.embeddings import load_embedder, load_tuned_embedder
    from core.store import open_store
    from ingest.service import build_indexer

    store = None
    try:
        store = open_store(settings)
        embedder = load_embedder(settings.embedding)
        tuned = load_tuned_embedder(settings, embedder)
        indexer = build_indexer(settings, store, embedder, tuned)
        if tuned_only:
            return _tuned_vector(settings, store, indexer, progress=not args.no_progress and sys.stderr.isatty())
        report = indexer.run(
            args.paths, prune=args.prune, dry_run=args.dry_run, reembed=args.reembed,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except (StoreError, ModelUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the index is consistent; run the same command again to finish", file=sys.stderr)
        return 130
    finally:
        if store is not None:
            store.close()

    for failure in report.failed:
        print(f"failed: {failure}", file=sys.stderr)
    if args.dry_run:
        for label, items in (("add", report.added), ("change", report.changed), ("remove", report.removed)):
            for item in items:
                print(f"would {label}: {item}")
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    print(("dry run: " if args.dry_run else "") + report.summary(), file=sys.stderr)
    return 0 if report.ok else 1


def _tuned_vector(settings: "Settings", store: "Store", indexer: "Indexer", progress: bool) -> int:
    """python -m ingest tuned-vector: the tuned vector for every stored chunk, base vectors kept."""
    import time

    if indexer.tuned is None:
        print("error: retrieval.tuned_embedder is not set: nothing to add (e.g. --set "
              "retrieval.tuned_embedder=data/adapters/demo-embedder)", file=sys.stderr)
        return 2
    if not store.exists():
        print(f"error: the collection {settings.qdrant.collection!r} does not exist yet: "
              "python -m ingest PATH... writes both vectors", file=sys.stderr)
        return 2
    store.check_embedder(indexer.embedder.info)
    started = time.perf_counter()
    filled = indexer.prepare_tuned_vector(progress=progress)
    seconds = time.perf_counter() - started
    name = settings.retrieval.tuned_vector
    if filled:
        print(f"{filled} chunks got their {name!r} vector from {indexer.tuned.info.name} in {seconds:.1f} s", file=sys.stderr)
    else:
        print(f"the {name!r} vectors are already those of {indexer.tuned.info.name}: nothing to do", file=sys.stderr)
    return 0
