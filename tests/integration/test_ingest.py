"""Ingest against the real embedder (all-MiniLM-L6-v2) and the real embedded store (Qdrant Edge)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from core.embeddings import EmbedderInfo
from core.store import CollectionMismatchError, open_store
from ingest.indexer import Indexer
from ingest.service import build_indexer
from tests.conftest import PUBMEDQA, REPO


@pytest.fixture
def index(settings_factory, embedder):
    """A fresh collection and an Indexer on it; closed after the test."""
    settings = settings_factory()
    store = open_store(settings)
    yield settings, store, build_indexer(settings, store, embedder)
    store.close()


def stored(store) -> list[dict]:
    physical = store.physical_name()
    return [r.payload["metadata"] | {"id": r.id, "text": r.payload["page_content"]}
            for r in (store.scroll(physical) if physical else [])]


def assert_consistent(points: list[dict]) -> None:
    """Each document has exactly one hash, all its chunks, and no duplicate chunk."""
    by_doc: dict[str, list[dict]] = {}
    for p in points:
        by_doc.setdefault(p["doc_id"], []).append(p)
    for doc_id, items in by_doc.items():
        assert len({p["doc_hash"] for p in items}) == 1, f"{doc_id} holds two versions"
        assert sorted(p["chunk_index"] for p in items) == list(range(items[0]["chunk_count"])), doc_id


def test_demo_ingest_is_incremental(index, demo_copy: Path) -> None:
    settings, store, indexer = index

    first = indexer.run([demo_copy], progress=False)
    assert first.ok, first.failed
    assert len(first.added) >= 30  # 24 files, the FAQ JSONL counting one document per record
    assert not any("/qa/" in s for s in first.added)  # skipped by data/demo/.ragtuneignore
    assert first.chunks_embedded == len(stored(store))
    formats = {Path(s.split("#")[0]).suffix for s in first.added}
    assert formats >= {".md", ".txt", ".pdf", ".html", ".docx", ".csv", ".jsonl"}

    second = indexer.run([demo_copy], progress=False)
    assert second.chunks_embedded == 0 and not second.added and not second.changed
    assert len(second.unchanged) == len(first.added)

    policy = demo_copy / "policies" / "hand-hygiene.md"
    policy.write_text(policy.read_text() + "\n## Addendum\n\nAlcohol rub dispensers are refilled every Monday.\n")
    before = {p["id"] for p in stored(store) if p["source_file"] != str(policy)}
    third = indexer.run([demo_copy], progress=False)
    assert [Path(s).name for s in third.changed] == ["hand-hygiene.md"] and not third.added
    after = stored(store)
    assert {p["id"] for p in after if p["source_file"] != str(policy)} == before  # nothing else rewritten
    assert any("refilled every Monday" in p["text"] for p in after)
    assert_consistent(after)

    leaflet = demo_copy / "leaflets" / "home-blood-pressure-monitoring.html"
    leaflet_points = sum(p["source_file"] == str(leaflet) for p in after)
    leaflet.unlink()
    dry = indexer.run([demo_copy], prune=True, dry_run=True, progress=False)
    assert [Path(s).name for s in dry.removed] == [leaflet.name]
    assert len(stored(store)) == len(after)  # a dry run writes nothing
    kept = indexer.run([demo_copy], progress=False)
    assert [Path(s).name for s in kept.stale] == [leaflet.name] and len(stored(store)) == len(after)
    pruned = indexer.run([demo_copy], prune=True, progress=False)
    assert [Path(s).name for s in pruned.removed] == [leaflet.name]
    assert len(stored(store)) == len(after) - leaflet_points
    assert not any(p["source_file"] == str(leaflet) for p in stored(store))


def test_chunks_fit_the_embedder_and_keep_page_and_section(index, demo_copy: Path, embedder) -> None:
    settings, store, indexer = index
    long_doc = demo_copy / "long.md"
    long_doc.write_text("# Long\n\n" + " ".join(f"word{i}" for i in range(3000)) + "\n\n" + "x" * 6000 + "\n")
    assert indexer.run([demo_copy], progress=False).ok
    points = stored(store)
    for p in points:
        embedded = f"{p['title']} | {p['section']}" if p.get("section") and p["section"] != p["title"] else p["title"]
        assert embedder.count_tokens(f"{embedded}\n{p['text']}") <= embedder.info.max_tokens - 2, p["source"]
    pdf_pages = {p["page"] for p in points if p["source"].endswith("renal-dosing-handbook.pdf")}
    assert pdf_pages == {1, 2, 3}
    docx_sections = {p.get("section") for p in points if p["source"].endswith(".docx")}
    assert any(s and ">" in s for s in docx_sections), docx_sections  # heading path kept
    csv_rows = [p for p in points if p["source"].endswith(".csv")]
    assert csv_rows and all(p.get("row") for p in csv_rows)
    assert len([p for p in points if p["source"].endswith("long.md")]) >= 12  # 3000 words + 6000 chars, cut


def test_bad_inputs_are_reported_and_never_touch_the_index(index, tmp_path: Path, settings_factory, embedder) -> None:
    settings, store, indexer = index
    docs = tmp_path / "docs"
    docs.mkdir()
    good = docs / "good.md"
    good.write_text("# Good\n\nCardivexin lowers systolic blood pressure.\n")
    victim = docs / "victim.md"
    victim.write_text("# Victim\n\nThis document is indexed first and corrupted later.\n")
    assert indexer.run([docs], progress=False).ok
    victim_points = [p["id"] for p in stored(store) if p["source_file"] == str(victim)]

    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02\x03binary\x00")
    (docs / "empty.md").write_text("")
    (docs / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (docs / "huge.txt").write_text("a" * 3000)
    (docs / "loop").symlink_to(docs, target_is_directory=True)
    (docs / "a.md").symlink_to(docs / "b.md")
    (docs / "b.md").symlink_to(docs / "a.md")
    (docs / "records.jsonl").write_text(
        '{"id": "r1", "text": "Hemarovin is stopped 72 hours before surgery."}\n'
        "{not json\n"
        '{"id": "r3", "body": "the text is in another field"}\n'
    )
    victim.write_bytes(b"\x00\xff\x00 corrupted")

    small_limit = settings_factory(ingest={"max_file_mb": 0.002})
    indexer = build_indexer(small_limit, store, embedder)
    report = indexer.run([docs], prune=True, progress=False)

    reasons = {Path(f.path).name: f.reason for f in report.failed}
    assert "pdf" in reasons["broken.pdf"].lower() or "parse" in reasons["broken.pdf"]
    assert "binary" in reasons["binary.txt"]
    assert "empty" in reasons["empty.md"]
    assert "UTF-8" in reasons["latin1.txt"] and "0xe9" in reasons["latin1.txt"]
    assert "max_file_mb" in reasons["huge.txt"]
    assert "loop" in reasons["loop"] or "loop" in reasons.get("docs", "")
    assert any(name in reasons for name in ("a.md", "b.md"))
    assert "not valid JSON" in reasons["records.jsonl:2"]
    assert "'text'" in reasons["records.jsonl:3"]
    assert "binary" in reasons["victim.md"]
    assert not report.ok
    assert any(s.endswith("records.jsonl#r1") for s in report.added)
    # The corrupted file's document keeps its points, even with --prune.
    assert [p["id"] for p in stored(store) if p["source_file"] == str(victim)] == victim_points
    assert report.removed == []


def test_cli_exit_status_and_summary(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "note.txt").write_text("Visiting hours on ICU are 10:00 to 21:00.\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGTUNE_")}
    env |= {"RAGTUNE_DATA_DIR": str(tmp_path / "data")}
    ok = subprocess.run([sys.executable, "-m", "ingest", str(docs), "--json"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["added"] and "1 added" in ok.stderr
    (docs / "bad.txt").write_bytes(b"\x00\x00")
    failed = subprocess.run([sys.executable, "-m", "ingest", str(docs)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    assert "bad.txt: binary content" in failed.stderr and "1 unchanged" in failed.stderr
    helped = subprocess.run([sys.executable, "-m", "ingest", "--help"], cwd=REPO, env=env, capture_output=True, text=True)
    assert "python -m ingest data/demo --prune" in helped.stdout


def test_kill_9_mid_run_is_finished_by_the_next_run(tmp_path: Path, demo_copy: Path, settings_factory, embedder) -> None:
    settings = settings_factory(embedding={"batch_size": 4})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGTUNE_")}
    env |= {
        "RAGTUNE_DATA_DIR": str(settings.data_dir),
        "RAGTUNE_QDRANT__PATH": str(settings.qdrant.path),
        "RAGTUNE_EMBEDDING__BATCH_SIZE": "4",
    }
    process = subprocess.Popen([sys.executable, "-m", "ingest", str(demo_copy)], cwd=REPO, env=env,
                               stderr=subprocess.PIPE, text=True)
    indexed = 0
    assert process.stderr is not None
    for line in process.stderr:
        indexed += "indexed" in line
        if indexed == 3:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "ingest finished before it could be interrupted"

    store = open_store(settings)
    try:
        partial = len(stored(store))
        report = build_indexer(settings, store, embedder).run([demo_copy], progress=False)
        assert report.ok and len(report.unchanged) >= 3  # finished documents are not redone
        points = stored(store)
        assert len(points) > partial
        assert_consistent(points)
        assert len({p["doc_id"] for p in points}) == len(report.unchanged) + len(report.added) + len(report.changed)
        assert Counter(p["id"] for p in points).most_common(1)[0][1] == 1
    finally:
        store.close()


def test_crash_between_writing_and_deleting_is_cleaned_up(index, demo_copy: Path, monkeypatch) -> None:
    settings, store, indexer = index
    assert indexer.run([demo_copy], progress=False).ok
    target = demo_copy / "monographs" / "lipostrane.md"
    target.write_text(target.read_text().replace("Lipostrane", "Lipostrane (LPS)"))

    real_delete = Indexer._delete

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies right after the new points were written

    monkeypatch.setattr(Indexer, "_delete", die)
    with pytest.raises(KeyboardInterrupt):
        indexer.run([demo_copy], progress=False)
    hashes = {p["doc_hash"] for p in stored(store) if p["source_file"] == str(target)}
    assert len(hashes) == 2  # old and new side by side: nothing lost

    monkeypatch.setattr(Indexer, "_delete", real_delete)
    report = indexer.run([demo_copy], progress=False)
    assert [Path(s).name for s in report.changed] == ["lipostrane.md"] and report.chunks_embedded == 0
    assert_consistent(stored(store))


def test_embedder_mismatch_is_refused_until_reembed(index, demo_copy: Path, embedder) -> None:
    settings, store, indexer = index
    faq = demo_copy / "faq"
    assert indexer.run([faq], progress=False).ok
    count = len(stored(store))

    # The same weights under another recorded name stand in for a different model: only the
    # packaged embedder exists offline, and the refusal is about the record, not the weights.
    other = dataclasses.replace(embedder, info=EmbedderInfo("acme/other-embedder", 384, 256))
    mismatched = build_indexer(settings, store, other)
    with pytest.raises(CollectionMismatchError) as refusal:
        mismatched.run([faq], progress=False)
    message = str(refusal.value)
    assert "sentence-transformers/all-MiniLM-L6-v2" in message and "--reembed" in message
    assert len(stored(store)) == count  # nothing touched

    old_physical = store.physical_name()
    report = mismatched.run([faq], reembed=True, progress=False)
    assert report.ok and len(report.added) == len(json.loads("[" + ",".join(
        line for line in (faq / "staff-faq.jsonl").read_text().splitlines() if line.strip()) + "]"))
    assert store.physical_name() != old_physical
    assert old_physical not in store.generations()
    assert store.recorded_embedder().name == "acme/other-embedder"
    assert len(stored(store)) == count
    with pytest.raises(CollectionMismatchError):
        indexer.run([faq], progress=False)  # now the original embedder is the stranger


def test_pubmedqa_records_are_documents_and_retrievable(index, tmp_path: Path, embedder) -> None:
    settings, store, indexer = index
    corpus = [json.loads(line) for line in (PUBMEDQA / "corpus.jsonl").read_text().splitlines()]
    questions = {q["id"]: q for q in map(json.loads, (PUBMEDQA / "dev.jsonl").read_text().splitlines())}
    subset = [r for r in corpus if r["id"] in questions][:30]
    sample = tmp_path / "pubmedqa-sample.jsonl"  # a temporary slice, read from ../shared by path
    sample.write_text("".join(json.dumps(r) + "\n" for r in subset))

    indexer = build_indexer(
        settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"jsonl_text_field": "contexts"})}),
        store, embedder,
    )
    report = indexer.run([sample], progress=False)
    assert report.ok and len(report.added) == 30

    from core.retrieval import Retriever

    retriever = Retriever(store, embedder, settings)
    hits = 0
    for record in subset[:10]:
        top = retriever.hits(questions[record["id"]]["question"], k=3, threshold=False)
        hits += top[0].payload["metadata"]["record_id"] == record["id"]
        assert top[0].payload["metadata"]["meshes"]  # the record's other fields travel as metadata
    assert hits >= 8
