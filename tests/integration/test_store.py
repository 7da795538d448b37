"""The store (core.store): one test body over Qdrant Edge and, when QDRANT_URL is set, a real
Qdrant server; the second-process message; the migration from qdrant-client's local mode.

Crash safety of ingest on the store (kill -9 mid-run, then re-run: no duplicate, no lost
document) is tests/integration/test_ingest.py::test_kill_9_mid_run_is_finished_by_the_next_run;
an upload seen by its owner only is tests/integration/test_security.py (over the launched app).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from core.embeddings import EmbedderInfo
from core.retrieval import Retriever
from core.store import (
    CollectionMismatchError, SearchFilter, StoreError, StorePoint, open_store,
)
from tests.conftest import REPO

BACKENDS = ["edge"] + (["server"] if os.environ.get("QDRANT_URL") else [])

TEXTS = [
    ("monograph", "public", "Cardivexin starts at 10 mg once daily in adults with HTN."),
    ("monograph", "public", "Reduce the Cardivexin dose when eGFR is below 45 mL/min."),
    ("protocol", "public", "The door-to-balloon target for STEMI is 90 minutes."),
    ("memo", "owner:alice", "The Quibbleflux memo says Cardivexin starts at 250 mg three times daily."),
]


@pytest.fixture(params=BACKENDS)
def store(request, settings_factory):
    if request.param == "server":
        # A real server is shared: a collection of this test's own, dropped afterwards.
        settings = settings_factory(qdrant={"url": os.environ["QDRANT_URL"], "api_key": os.environ.get("QDRANT_API_KEY"),
                                            "collection": f"test_{uuid.uuid4().hex[:12]}"})
    else:
        settings = settings_factory()
    opened = open_store(settings)
    yield settings, opened
    if request.param == "server":
        for generation in opened.generations():
            opened.drop(generation)
    opened.close()


def points(embedder, version: str = "h1") -> list[StorePoint]:
    vectors = embedder.embeddings.embed_documents([t for _, _, t in TEXTS])
    return [
        StorePoint(str(uuid.uuid5(uuid.NAMESPACE_URL, f"{doc}/{i}/{version}")), {"dense": v}, text,
                   {"page_content": text, "metadata": {"doc_id": doc, "doc_hash": version, "scope": scope,
                                                       "title": doc, "source": f"{doc}.md", "chunk_index": i}})
        for i, ((doc, scope, text), v) in enumerate(zip(TEXTS, vectors))
    ]


def test_one_body_over_each_backend(store, embedder) -> None:
    settings, opened = store
    physical = opened.ensure(embedder.info)
    assert opened.recorded_embedder().name == embedder.info.name
    opened.upsert(physical, points(embedder))
    opened.upsert(physical, points(embedder))  # the same ids again: overwritten, not duplicated
    assert opened.count() == 4
    assert opened.count(SearchFilter(scopes=["public"])) == 3

    retriever = Retriever(opened, embedder, settings)
    for method in ("dense", "sparse", "fused"):
        found = retriever.with_settings(method=method, score_threshold=None).retrieve(
            "Cardivexin dose when eGFR is low", scopes=["public"])
        assert found and all("Quibbleflux" not in s.text for s in found), method  # alice's memo is hers
        assert "eGFR" in found[0].text, method
        vector = embedder.embeddings.embed_query("Cardivexin dose when eGFR is low")
        # The score is always the dense cosine, whatever ranked the chunk: the threshold reads it.
        assert abs(found[0].score - sum(a * b for a, b in zip(vector, embedder.embeddings.embed_documents(
            [found[0].text])[0]))) < 0.05, method
    mine = retriever.retrieve("What does the Quibbleflux memo say about Cardivexin?", scopes=["public", "owner:alice"])
    assert any("Quibbleflux" in s.text for s in mine)
    # BM25 finds an exact token that the dense ranking misses among the top 1.
    exact = retriever.with_settings(method="sparse", k=1, score_threshold=None).retrieve("STEMI", scopes=["public"])
    assert "STEMI" in exact[0].text

    # Room for a tuned embedder: a second named vector on the same points, searched by name.
    opened.add_dense_vector(physical, "dense_tuned", 384)
    tuned = {p.id: list(reversed(p.vectors["dense"])) for p in points(embedder)}  # any other vector space
    opened.set_vectors(physical, "dense_tuned", tuned)
    probe = tuned[points(embedder)[2].id]
    assert opened.search(probe, None, 1, using="dense_tuned")[0].payload["metadata"]["doc_id"] == "protocol"
    assert {r.id: sorted(r.vectors) for r in opened.scroll(physical, with_vectors=True)}[points(embedder)[2].id] == [
        "dense", "dense_tuned"]

    opened.upsert(physical, points(embedder, version="h2")[:2])  # a changed monograph: new hash beside old
    opened.delete_document(physical, "monograph", keep_hash="h2")
    kept = [r.payload["metadata"] for r in opened.scroll(physical, fields=["doc_id", "doc_hash"])]
    assert sorted((m["doc_id"], m["doc_hash"]) for m in kept) == [
        ("memo", "h1"), ("monograph", "h2"), ("monograph", "h2"), ("protocol", "h1")]
    with pytest.raises(CollectionMismatchError, match="--reembed"):
        opened.check_embedder(EmbedderInfo("acme/other-embedder", 384, 256))


def test_a_second_process_is_told_what_to_do(settings_factory, tmp_path: Path) -> None:
    settings = settings_factory()
    held = open_store(settings)  # as the chat app holds it
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAGTUNE_")}
        env |= {"RAGTUNE_DATA_DIR": str(settings.data_dir), "RAGTUNE_QDRANT__PATH": str(settings.qdrant.path)}
        second = subprocess.run([sys.executable, "-m", "ingest", str(REPO / "data" / "demo" / "faq")], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=120)
    finally:
        held.close()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "open in another process" in second.stderr and "upload" in second.stderr and "qdrant.url" in second.stderr


def test_migrate_moves_a_local_mode_index_without_dropping_anything(settings_factory, embedder, tmp_path) -> None:
    from qdrant_client import QdrantClient, models

    from ingest.migrate import migrate

    settings = settings_factory()
    folder = Path(settings.qdrant.path)
    upload = f"/srv/uploads/{'a' * 32}/{'b' * 64}/memo.md"
    texts = [t for _, _, t in TEXTS]
    vectors = embedder.embeddings.embed_documents([f"{doc}\n{t}" for doc, _, t in TEXTS])
    old = QdrantClient(path=str(folder))  # the layout ragtune wrote before: alias, unnamed vector, record
    old.create_collection("ragtune__1", vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE),
                          metadata={"ragtune": {"embedder": embedder.info.name, "dimension": 384, "schema": 1}})
    old.update_collection_aliases(change_aliases_operations=[models.CreateAliasOperation(
        create_alias=models.CreateAlias(collection_name="ragtune__1", alias_name="ragtune"))])
    ids = [str(uuid.uuid4()) for _ in TEXTS]
    old.upsert("ragtune__1", points=[
        models.PointStruct(id=i, vector=v, payload={"page_content": t, "metadata": {
            "doc_id": doc, "doc_hash": "h", "title": doc,
            "source_file": upload if doc == "memo" else f"/kb/{doc}.md", "source": f"{doc}.md"}})
        for i, v, (doc, _, t) in zip(ids, vectors, TEXTS)])
    old.close()

    with pytest.raises(StoreError, match="python -m ingest migrate"):
        open_store(settings)  # the old folder is recognised, not mistaken for an empty store
    report = migrate(settings, embedder)
    assert [(m.collection, m.points, m.reembedded) for m in report.moved] == [("ragtune", 4, False)]
    assert report.kept_at is not None and (report.kept_at / "meta.json").is_file()  # the old index is kept

    store = open_store(settings)
    try:
        records = {r.id: r for r in store.scroll(store.physical_name(), with_vectors=True)}
        assert set(records) == set(ids)
        for i, v, t in zip(ids, vectors, texts):
            assert records[i].payload["page_content"] == t
            assert abs(sum(a * b for a, b in zip(records[i].vectors["dense"], v)) - 1) < 1e-4  # copied as they were
        scopes = {r.payload["metadata"]["doc_id"]: r.payload["metadata"]["scope"] for r in records.values()}
        assert scopes == {"monograph": "public", "protocol": "public", "memo": "owner:" + "a" * 32}
        found = Retriever(store, embedder, settings).retrieve("door-to-balloon target for STEMI", scopes=["public"])
        assert "STEMI" in found[0].text
    finally:
        store.close()
