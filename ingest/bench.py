"""python -m ingest.bench: ingest throughput beside the embedder's own speed.

For each corpus, in a fresh temporary Qdrant folder: a first run (chunks/s), an unchanged
re-run, and the time the embedder alone takes on the very same chunk texts, so the overhead
of loading, chunking and Qdrant writes is visible.

Examples:
  python -m ingest.bench                                   # demo + PubMedQA (about 3 minutes here)
  python -m ingest.bench --corpus demo
  python -m ingest.bench --pubmedqa ../shared/data/pubmedqa/corpus.jsonl --batch-size 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from core.logs import setup_logging
from core.settings import load_settings, parse_overrides

REPO = Path(__file__).resolve().parent.parent


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.bench", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus", choices=["demo", "pubmedqa", "all"], default="all")
    parser.add_argument("--demo", type=Path, default=REPO / "data" / "demo")
    parser.add_argument("--pubmedqa", type=Path, default=REPO.parent / "shared" / "data" / "pubmedqa" / "corpus.jsonl")
    parser.add_argument("--batch-size", type=int, help="embedding batch size (default: embedding.batch_size)")
    parser.add_argument("--settings", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    return parser


def bench_corpus(name: str, path: Path, overrides: dict, settings_file: Path | None, embedder) -> dict:
    from core.store import open_client
    from ingest.service import build_indexer

    with tempfile.TemporaryDirectory(prefix="ragtune-bench-") as scratch:
        settings = load_settings(settings_file, overrides | {"qdrant": {"path": f"{scratch}/qdrant", "collection": f"bench_{name}"}})
        client = open_client(settings)
        indexer = build_indexer(settings, client, embedder)
        first = indexer.run([path], progress=False)
        rerun = indexer.run([path], progress=False)
        texts = []
        offset = None
        while True:  # the exact texts that were embedded, as stored
            page, offset = client.scroll(f"bench_{name}", limit=1024, offset=offset, with_payload=True)
            texts += [f"{_heading(r.payload['metadata'])}\n{r.payload['page_content']}" for r in page]
            if offset is None:
                break
        started = time.perf_counter()
        embedder.embeddings.embed_documents(texts)
        embed_only = time.perf_counter() - started
        client.close()
    return {
        "corpus": name, "documents": len(first.added), "chunks": first.chunks_embedded,
        "first_s": first.seconds, "first_rate": first.chunks_embedded / first.seconds,
        "rerun_s": rerun.seconds, "rerun_embedded": rerun.chunks_embedded,
        "embed_only_s": embed_only, "embed_only_rate": len(texts) / embed_only,
        "failed": len(first.failed),
    }


def _heading(meta: dict) -> str:
    section = meta.get("section")
    return f"{meta['title']} | {section}" if section and section != meta["title"] else meta["title"]


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.batch_size:
        overrides.setdefault("embedding", {})["batch_size"] = args.batch_size
    settings = load_settings(args.settings, overrides)
    setup_logging("WARNING")
    from core.embeddings import load_embedder

    embedder = load_embedder(settings.embedding)
    overrides.setdefault("ingest", {})
    rows = []
    if args.corpus in ("demo", "all"):
        rows.append(bench_corpus("demo", args.demo, overrides, args.settings, embedder))
    if args.corpus in ("pubmedqa", "all"):
        pub = overrides | {"ingest": overrides["ingest"] | {"jsonl_text_field": "contexts"}}
        rows.append(bench_corpus("pubmedqa", args.pubmedqa, pub, args.settings, embedder))
    print(f"embedder: {embedder.info.name}, batch {settings.embedding.batch_size}, "
          f"{__import__('torch').get_num_threads()} torch threads")
    print("| corpus | docs | chunks | first run s | chunks/s | unchanged re-run s | re-embedded | embedder alone s | embedder chunks/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['corpus']} | {r['documents']} | {r['chunks']} | {r['first_s']:.1f} | {r['first_rate']:.1f} | "
              f"{r['rerun_s']:.2f} | {r['rerun_embedded']} | {r['embed_only_s']:.1f} | {r['embed_only_rate']:.1f} |")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
