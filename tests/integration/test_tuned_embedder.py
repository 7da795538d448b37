"""The tuned embedder's second vector (issue 12): the committed demo-embedder LoRA of the packaged
all-MiniLM-L6-v2 and a real Qdrant Edge store in tmp.

What must hold at any size: ingest with retrieval.tuned_embedder writes both named vectors for
every chunk (and they differ); hybrid's retriever ranks by the tuned vector while rag's ranks by
"dense"; a collection without the tuned vector makes hybrid fall back to "dense" with a warning,
and ``prepare_tuned_vector`` (python -m ingest tuned-vector) adds it without touching the base
vectors; an adapter with other weights is noticed (stale), not mixed in.
"""

from __future__ import annotations

import logging

import pytest

from core.embeddings import EmbedderInfo, load_tuned_embedder
from core.modes import RETRIEVING_MODES
from core.retrieval import mode_retrievers
from core.store import DENSE, PUBLIC_SCOPE, open_store
from ingest.service import build_indexer
from tests.conftest import DEMO, REPO

ADAPTER = REPO / "data" / "adapters" / "demo-embedder"
DOCS = [DEMO / "protocols" / "chest-pain-acs.md", DEMO / "monographs" / "cardivexin.md", DEMO / "monographs" / "hemarovin.md",
        DEMO / "glossary"]


@pytest.fixture(scope="module")
def tuned_settings(tmp_path_factory: pytest.TempPathFactory, session_data_dir):
    from core.settings import load_settings

    folder = tmp_path_factory.mktemp("tuned")
    empty = folder / "settings.yaml"
    empty.write_text("")

    def make(**retrieval):
        return load_settings(empty, {"data_dir": str(session_data_dir), "qdrant": {"path": str(folder / "qdrant")},
                                     "retrieval": {"tuned_embedder": str(ADAPTER), **retrieval}})
    return make


@pytest.fixture(scope="module")
def tuned(tuned_settings, embedder):
    return load_tuned_embedder(tuned_settings(), embedder)


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_ingest_writes_both_vectors_and_hybrid_searches_the_tuned_one(tuned_settings, embedder, tuned) -> None:
    settings = tuned_settings()
    assert tuned.info.name.startswith(embedder.info.name + "+lora@")
    assert tuned.info.dimension == embedder.info.dimension
    store = open_store(settings)
    try:
        report = build_indexer(settings, store, embedder, tuned).run(DOCS, progress=False)
        assert report.ok and report.chunks_embedded > 10
        physical = store.physical_name()
        records = list(store.scroll(physical, with_vectors=True))
        assert len(records) == report.chunks_embedded
        assert all(sorted(r.vectors) == [DENSE, "dense_tuned"] for r in records)
        # The LoRA moved the vectors (the same text, another embedding).
        assert all(_dot(r.vectors[DENSE], r.vectors["dense_tuned"]) < 0.999 for r in records)
        assert store.vector_state("dense_tuned", tuned.info) == "ready"

        retrievers = mode_retrievers(store, embedder, tuned, settings)
        assert set(retrievers) == set(RETRIEVING_MODES)
        hybrid, rag = retrievers["hybrid"], retrievers["rag"]
        assert (hybrid.settings.vector, hybrid.embedder) == ("dense_tuned", tuned)
        assert (rag.settings.vector, rag.embedder) == (DENSE, embedder)

        # hybrid's dense ranking is the tuned cosine's order, each hit scored by the base cosine.
        query = "door-to-balloon time for a pt with STEMI?"
        by_id = {r.id: r for r in records}
        t_query = tuned.embeddings.embed_query(query)
        b_query = embedder.embeddings.embed_query(query)
        hits = hybrid.with_settings(method="dense", k=5, score_threshold=None).hits(query)
        expected = sorted(by_id, key=lambda i: -_dot(t_query, by_id[i].vectors["dense_tuned"]))[:5]
        assert [h.id for h in hits] == expected
        for hit in hits:
            assert abs(hit.score - _dot(b_query, by_id[hit.id].vectors[DENSE])) < 1e-3
        base_hits = rag.with_settings(method="dense", k=5, score_threshold=None).hits(query)
        assert [h.id for h in base_hits] == sorted(by_id, key=lambda i: -_dot(b_query, by_id[i].vectors[DENSE]))[:5]
        # Where it matters: the abbreviation question's gold document ranks at least as high.
        gold = "protocols/chest-pain-acs.md"

        def gold_rank(found) -> int:
            return next(n for n, s in enumerate(found, 1) if s.source.endswith(gold))

        wide = {"method": "dense", "k": 20, "score_threshold": None}
        assert gold_rank(hybrid.with_settings(**wide).retrieve(query, [PUBLIC_SCOPE])) <= gold_rank(
            rag.with_settings(**wide).retrieve(query, [PUBLIC_SCOPE]))
    finally:
        store.close()


def test_missing_vector_falls_back_then_is_added_without_touching_dense(
        tuned_settings, embedder, tuned, caplog: pytest.LogCaptureFixture) -> None:
    settings = tuned_settings()
    store = open_store(settings, collection="plain")
    try:
        assert build_indexer(settings, store, embedder).run(DOCS[1:2], progress=False).ok  # no tuned embedder
        physical = store.physical_name()
        before = {r.id: r.vectors for r in store.scroll(physical, with_vectors=True)}
        assert all(sorted(v) == [DENSE] for v in before.values())
        with caplog.at_level(logging.WARNING, logger="core.retrieval"):
            retrievers = mode_retrievers(store, embedder, tuned, settings)
        assert retrievers["hybrid"].settings.vector == DENSE and retrievers["hybrid"].embedder is embedder
        assert "python -m ingest tuned-vector" in caplog.text and "hybrid searches 'dense'" in caplog.text

        indexer = build_indexer(settings, store, embedder, tuned)
        assert indexer.prepare_tuned_vector(fill=False) == 0  # the chat's start-up never fills a stored index
        assert store.vector_state("dense_tuned", tuned.info) == "missing"
        assert indexer.prepare_tuned_vector() == len(before)  # what python -m ingest tuned-vector runs
        after = {r.id: r.vectors for r in store.scroll(physical, with_vectors=True)}
        assert set(after) == set(before)
        assert all(after[i][DENSE] == pytest.approx(before[i][DENSE], abs=1e-6) for i in before)
        assert store.vector_state("dense_tuned", tuned.info) == "ready"
        assert mode_retrievers(store, embedder, tuned, settings)["hybrid"].settings.vector == "dense_tuned"
        assert indexer.prepare_tuned_vector() == 0  # nothing to do the second time

        # A retrained adapter (other weights, another name in the record) is stale, not searched.
        other = EmbedderInfo(tuned.info.name.rsplit("@", 1)[0] + "@0000", tuned.info.dimension, tuned.info.max_tokens)
        assert store.vector_state("dense_tuned", other) == "stale"
        # Chunks written without the tuned embedder make the vector incomplete: hybrid stops using it.
        build_indexer(settings, store, embedder).run(DOCS[2:], progress=False)
        assert store.vector_state("dense_tuned", tuned.info) == "incomplete"
        assert mode_retrievers(store, embedder, tuned, settings)["hybrid"].settings.vector == DENSE
    finally:
        store.close()
