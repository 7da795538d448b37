"""python -m ingest.bench: ingest throughput beside the embedder's own speed, and the store at scale.

For each corpus, in a fresh temporary store: a first run (chunks/s), an unchanged re-run, and
the time the embedder alone takes on the very same chunk texts, so the overhead of loading,
chunking and store writes is visible.

--scale N measures the store itself at N points, through the project's own store code
(core.store): real chunks (PubMedQA, else the demo) are ingested and embedded once, then
repeated to N points, each copy's vector the real one plus small noise (distinct points with
the distribution of real embedded text) and its payload the real chunk text and metadata (1 in
10 an upload's scope). It reports the write, the HNSW build, the time to open the folder again,
query latency at k=16 with a scope filter (the demo questions, embedded), peak memory of the
process holding the store, and recall@10 against exact search with the same filter. The anchor,
qdrant-client's local mode (the store before Qdrant Edge) through the same code, runs at
--anchor-scale points in the same run (default 10,000: at 100,000 its write alone took minutes).
Each store runs in a child process, so the peak memory is the store's, without the embedder.

Examples:
  python -m ingest.bench                                   # demo + PubMedQA (about 3 minutes here)
  python -m ingest.bench --corpus demo
  python -m ingest.bench --pubmedqa ../shared/data/pubmedqa/corpus.jsonl --batch-size 64
  python -m ingest.bench --scale 100000                    # Qdrant Edge at 100k points, local mode at 10k
  python -m ingest.bench --scale 20000 --anchor-scale 0    # Edge only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from core.logs import setup_logging
from core.settings import load_settings, parse_overrides

REPO = Path(__file__).resolve().parent.parent
SCALE_K = 16
RECALL_K = 10


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.bench", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Examples:", 1)[0].split("\n\n", 1)[1] + "Examples:" + __doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus", choices=["demo", "pubmedqa", "all"], default="all")
    parser.add_argument("--demo", type=Path, default=REPO / "data" / "demo")
    parser.add_argument("--pubmedqa", type=Path, default=REPO.parent / "shared" / "data" / "pubmedqa" / "corpus.jsonl")
    parser.add_argument("--batch-size", type=int, help="embedding batch size (default: embedding.batch_size)")
    parser.add_argument("--scale", type=int, metavar="N", help="measure the store at N points instead of ingest")
    parser.add_argument("--anchor-scale", type=int, default=10_000, metavar="M",
                        help="--scale: points for the qdrant-client local-mode anchor (0: none); at most N")
    parser.add_argument("--queries", type=int, default=200, help="--scale: queries timed (the demo questions, repeated)")
    parser.add_argument("--settings", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    parser.add_argument("--scale-child", nargs=3, metavar=("DIR", "BACKEND", "N"), help=argparse.SUPPRESS)
    return parser


def bench_corpus(name: str, path: Path, overrides: dict, settings_file: Path | None, embedder) -> dict:
    from core.store import open_store
    from ingest.service import build_indexer

    with tempfile.TemporaryDirectory(prefix="ragtune-bench-") as scratch:
        settings = load_settings(settings_file, overrides | {"qdrant": {"path": f"{scratch}/qdrant", "collection": f"bench_{name}"}})
        store = open_store(settings)
        indexer = build_indexer(settings, store, embedder)
        embedder.embeddings.embed_documents(["warm-up"] * 8)  # no row pays the model's first batch
        first = indexer.run([path], progress=False)
        rerun = indexer.run([path], progress=False)
        physical = store.physical_name()
        # the exact texts that were embedded, as stored
        texts = [f"{_heading(r.payload['metadata'])}\n{r.payload['page_content']}" for r in store.scroll(physical)]
        started = time.perf_counter()
        embedder.embeddings.embed_documents(texts)
        embed_only = time.perf_counter() - started
        store.close()
        naive_s = naive_langchain_seconds(texts, embedder)
    return {
        "corpus": name, "documents": len(first.added), "chunks": first.chunks_embedded,
        "first_s": first.seconds, "first_rate": first.chunks_embedded / first.seconds,
        "rerun_s": rerun.seconds, "rerun_embedded": rerun.chunks_embedded,
        "embed_only_s": embed_only, "embed_only_rate": len(texts) / embed_only,
        "naive_s": naive_s, "naive_rate": len(texts) / naive_s if naive_s else None,
        "failed": len(first.failed),
    }


def naive_langchain_seconds(texts: list[str], embedder) -> float | None:
    """The anchor: LangChain's ``QdrantVectorStore.from_documents`` on the same chunk texts (already
    split, so it does less than ingest: no loading, no chunking), into qdrant-client's in-memory
    mode. None when langchain-qdrant is not installed (requirements-dev.txt has it)."""
    try:
        from langchain_core.documents import Document
        from langchain_qdrant import QdrantVectorStore
    except ImportError:
        return None
    started = time.perf_counter()
    store = QdrantVectorStore.from_documents([Document(page_content=t) for t in texts], embedder.embeddings,
                                             location=":memory:", collection_name="naive")
    seconds = time.perf_counter() - started
    store.client.close()
    return seconds


# -- the store at scale ----------------------------------------------------------------------
def prepare_scale(folder: Path, args: argparse.Namespace, overrides: dict, embedder) -> dict[str, Any]:
    """Real chunks and their vectors, and the demo questions' vectors, saved for the children."""
    import numpy as np

    from core.qa import load_qa
    from core.store import open_store
    from ingest.service import build_indexer

    pubmedqa = args.pubmedqa.is_file()
    source, extra = (args.pubmedqa, {"jsonl_text_field": "contexts"}) if pubmedqa else (args.demo, {})
    settings = load_settings(args.settings, overrides | {
        "qdrant": {"path": str(folder / "base"), "collection": "base"},
        "ingest": overrides.get("ingest", {}) | extra})
    store = open_store(settings)
    started = time.perf_counter()
    build_indexer(settings, store, embedder).run([source], progress=False)
    embed_s = time.perf_counter() - started
    records = list(store.scroll(store.physical_name(), with_vectors=True))
    store.close()
    np.save(folder / "base.npy", np.array([r.vectors["dense"] for r in records], dtype=np.float32))
    (folder / "payloads.json").write_text(json.dumps([r.payload for r in records]))
    questions = [r.question for r in load_qa(args.demo / "qa" / "test.jsonl")]
    np.save(folder / "queries.npy", np.array(embedder.embeddings.embed_documents(questions), dtype=np.float32))
    (folder / "query_texts.json").write_text(json.dumps(questions))
    return {"base": len(records), "source": str(source), "embed_s": embed_s}


def run_child(folder: Path, backend: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "ingest.bench", "--scale-child", str(folder), backend, str(n),
               "--queries", str(args.queries)]
    for pair in args.overrides or []:
        command += ["--set", pair]
    if args.settings:
        command += ["--settings", str(args.settings)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {backend} store child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scale_child(folder: Path, backend: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One store, N points: write, build, reopen, query, recall. Prints one JSON line."""
    import numpy as np

    from core.embeddings import EmbedderInfo
    from core.store import DENSE, METADATA_KEY, SCOPE_KEY, SearchFilter, StorePoint

    settings = load_settings(args.settings, parse_overrides(args.overrides))
    base = np.load(folder / "base.npy")
    payloads = json.loads((folder / "payloads.json").read_text())
    queries = np.load(folder / "queries.npy")
    query_texts = json.loads((folder / "query_texts.json").read_text())
    info = EmbedderInfo("bench", int(base.shape[1]), 0)
    location = folder / f"store-{backend}"
    rng = np.random.default_rng(0)

    def open_it():
        if backend == "edge":
            from core.store_edge import EdgeStore

            return EdgeStore.open(str(location), "scale")
        from qdrant_client import QdrantClient

        from core.store_server import ServerStore

        return ServerStore(QdrantClient(path=str(location)), "scale")

    import warnings

    warnings.filterwarnings("ignore", message="Payload indexes have no effect")
    warnings.filterwarnings("ignore", message="Local mode is not recommended")
    store = open_it()
    physical = store.ensure(info)
    started = time.perf_counter()
    batch = 1024
    for start in range(0, n, batch):
        rows = range(start, min(start + batch, n))
        picks = [i % len(base) for i in rows]
        vectors = base[picks] + rng.normal(0, 0.02, size=(len(picks), base.shape[1])).astype(np.float32)
        points = []
        for i, j, vector in zip(rows, picks, vectors):
            payload = payloads[j]
            meta = dict(payload[METADATA_KEY]) | {"doc_id": f"{payload[METADATA_KEY]['doc_id']}~{i}",
                                                  SCOPE_KEY: f"owner:u{i % 50}" if i % 10 == 0 else "public"}
            text = f"{meta.get('title', '')}\n{payload['page_content']}"
            points.append(StorePoint(f"{i:08d}-0000-4000-8000-000000000000", {DENSE: vector.tolist()}, text,
                                     {**payload, METADATA_KEY: meta}))
        store.upsert(physical, points)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    store.optimize()
    build_s = time.perf_counter() - started
    store.close()

    started = time.perf_counter()
    store = open_it()
    count = store.count()
    open_s = time.perf_counter() - started
    assert count == n, (count, n)

    where = SearchFilter(scopes=["public", "owner:u10"])
    rows = [(queries[i % len(queries)].tolist(), query_texts[i % len(queries)]) for i in range(args.queries)]
    result: dict[str, Any] = {"backend": backend, "n": n, "write_s": write_s, "build_s": build_s, "open_s": open_s}
    for mode in ("dense", "fused"):
        for vector, text in rows[:5]:  # warm-up
            store.search(vector, text, SCALE_K, mode=mode, where=where, hnsw_ef=settings.retrieval.hnsw_ef)
        times, recalls = [], []
        for vector, text in rows:
            t0 = time.perf_counter()
            hits = store.search(vector, text, SCALE_K, mode=mode, where=where, hnsw_ef=settings.retrieval.hnsw_ef,
                                candidates=settings.retrieval.candidates)
            times.append((time.perf_counter() - t0) * 1000)
            truth = store.search(vector, text, RECALL_K, mode=mode, where=where, exact=True,
                                 candidates=settings.retrieval.candidates)
            recalls.append(len({h.id for h in hits[:RECALL_K]} & {h.id for h in truth}) / max(len(truth), 1))
        times.sort()
        result[mode] = {"p50_ms": times[len(times) // 2], "p95_ms": times[int(len(times) * 0.95) - 1],
                        "recall": sum(recalls) / len(recalls)}
    store.close()
    result["rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: that one survives
    exec and would report the parent's peak (the embedder's torch) for a child."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale_line(r: dict[str, Any], mode: str) -> str:
    m = r[mode]
    return (f"scale N={r['n']}: open {r['open_s']:.2f} s, query p50 {m['p50_ms']:.1f} ms, p95 {m['p95_ms']:.1f} ms, "
            f"RSS {r['rss_mb']:.0f} MB, recall@10 {m['recall']:.3f}")


def bench_scale(args: argparse.Namespace, overrides: dict, embedder) -> int:
    from core.store import store_backend

    settings = load_settings(args.settings, overrides)
    if store_backend(settings) != "edge":
        raise SystemExit("--scale measures the embedded store (qdrant.backend=edge); unset qdrant.url")
    with tempfile.TemporaryDirectory(prefix="ragtune-scale-") as scratch:
        folder = Path(scratch)
        base = prepare_scale(folder, args, overrides, embedder)
        print(f"base: {base['base']} real chunks of {base['source']} (ingested in {base['embed_s']:.1f} s), "
              f"repeated with noise; k={SCALE_K}, scope filter, retrieval.hnsw_ef={settings.retrieval.hnsw_ef}, "
              f"{args.queries} queries", flush=True)
        results = []
        anchor = min(args.anchor_scale, args.scale)
        if anchor:
            results.append(run_child(folder, "local", anchor, args))
        results.append(run_child(folder, "edge", args.scale, args))
    print("| store | points | write s | index build s | open s | dense p50 / p95 ms | dense recall@10 | "
          "fused p50 / p95 ms | fused recall@10 | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"edge": "Qdrant Edge (qdrant.backend=edge)", "local": "qdrant-client local mode (anchor)"}
    for r in results:
        print(f"| {names[r['backend']]} | {r['n']} | {r['write_s']:.1f} | {r['build_s']:.1f} | {r['open_s']:.2f} | "
              f"{r['dense']['p50_ms']:.1f} / {r['dense']['p95_ms']:.1f} | {r['dense']['recall']:.3f} | "
              f"{r['fused']['p50_ms']:.1f} / {r['fused']['p95_ms']:.1f} | {r['fused']['recall']:.3f} | {r['rss_mb']:.0f} |")
    for r in results:
        if r["backend"] == "local":
            print(f"anchor, local mode, dense: {scale_line(r, 'dense')}")
    edge = results[-1]
    print(f"edge, dense: {scale_line(edge, 'dense')}")
    method = "fused" if settings.retrieval.method == "fused" else "dense"
    print(f"edge, {method} (retrieval.method={settings.retrieval.method}):")
    print(scale_line(edge, method))
    return 0


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
    if args.scale_child:
        folder, backend, n = args.scale_child
        print(json.dumps(scale_child(Path(folder), backend, int(n), args)))
        return 0
    from core.embeddings import load_embedder

    embedder = load_embedder(settings.embedding)
    if args.scale:
        return bench_scale(args, overrides, embedder)
    overrides.setdefault("ingest", {})
    rows = []
    if args.corpus in ("demo", "all"):
        rows.append(bench_corpus("demo", args.demo, overrides, args.settings, embedder))
    if args.corpus in ("pubmedqa", "all"):
        pub = overrides | {"ingest": overrides["ingest"] | {"jsonl_text_field": "contexts"}}
        rows.append(bench_corpus("pubmedqa", args.pubmedqa, pub, args.settings, embedder))
    print(f"embedder: {embedder.info.name}, batch {settings.embedding.batch_size}, "
          f"{__import__('torch').get_num_threads()} torch threads")
    print("| corpus | docs | chunks | first run s | chunks/s | unchanged re-run s | re-embedded | embedder alone s "
          "| embedder chunks/s | naive LangChain from_documents chunks/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        naive = f"{r['naive_rate']:.1f}" if r["naive_rate"] else "(langchain-qdrant not installed)"
        print(f"| {r['corpus']} | {r['documents']} | {r['chunks']} | {r['first_s']:.1f} | {r['first_rate']:.1f} | "
              f"{r['rerun_s']:.2f} | {r['rerun_embedded']} | {r['embed_only_s']:.1f} | {r['embed_only_rate']:.1f} | {naive} |")
    for r in rows:
        line = f"{r['corpus']}: unchanged re-run {100 * r['rerun_s'] / r['first_s']:.1f}% of the first (target <= 5%)"
        if r["naive_rate"]:
            line += f"; ingest {r['first_rate'] / r['naive_rate']:.2f}x naive LangChain from_documents (target >= 2x)"
        print(line)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
