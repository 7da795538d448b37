"""Incremental, idempotent indexing of documents into the store (core.store).

The index itself is the record of what was ingested: every point carries its document's id,
content hash and chunk count. A run compares that with the files on disk:

- unchanged: all chunks of the current hash are stored, and nothing else for that document;
- new / changed: chunks are embedded and written under deterministic ids (uuid5 of document,
  hash, position and chunk text), then the document's points with another hash are deleted.
  New before old, so a reader never finds a document missing.

An interrupted run (Ctrl-C, kill -9) leaves at worst a document with a partial set of new
points beside its complete old set; the next run sees the new hash incomplete, rewrites the
same ids (no duplicates) and then deletes the old set. Failures to read a file never touch the
points already stored for it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.embeddings import Embedder
from core.settings import IngestSettings
from core.store import (
    CONTENT_KEY, DENSE, METADATA_KEY, PUBLIC_SCOPE, SCOPE_KEY, RecordedVector, Store, StoreError, StorePoint,
)
from ingest.chunking import Chunk, Chunker, payload_embed_text
from ingest.loaders import LoadFailure, SourceDocument, discover, load_file, pipeline_fingerprint

log = logging.getLogger(__name__)

_POINT_NAMESPACE = uuid.UUID("6f1c3e0a-5b7d-4c1e-9a51-2f7d0c9b8e41")
_SCROLL_PAGE = 1024
_STATE_FIELDS = ["doc_id", "doc_hash", "chunk_count", "source_file", "source"]


@dataclass
class StoredDocument:
    source_file: str
    source: str
    points_by_hash: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    chunk_count_by_hash: dict[str, int] = field(default_factory=dict)

    def complete(self, doc_hash: str) -> bool:
        expected = self.chunk_count_by_hash.get(doc_hash)
        return expected is not None and self.points_by_hash.get(doc_hash, 0) >= expected


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # files gone, kept because --prune was not given
    failed: list[LoadFailure] = field(default_factory=list)
    chunks_embedded: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        verb = "would be " if self.dry_run else ""
        line = (
            f"{len(self.added)} {verb}added, {len(self.changed)} {verb}changed, {len(self.unchanged)} unchanged, "
            f"{len(self.removed)} {verb}removed, {len(self.failed)} failed"
        )
        if not self.dry_run:
            rate = self.chunks_embedded / self.seconds if self.seconds else 0.0
            line += f"; {self.chunks_embedded} chunks embedded in {self.seconds:.1f} s ({rate:.1f} chunks/s)"
        if self.stale:
            line += f"; {len(self.stale)} documents whose files are gone are kept (use --prune to remove them)"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added, "changed": self.changed, "unchanged": self.unchanged,
            "removed": self.removed, "stale": self.stale,
            "failed": [{"path": f.path, "reason": f.reason} for f in self.failed],
            "chunks_embedded": self.chunks_embedded, "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
        }


@dataclass
class _Pending:
    """A document to (re)write: its chunks, and how many of them are stored so far."""

    document: SourceDocument
    chunks: list[Chunk]
    replaces: bool  # the index holds other points of this document, to delete once it is written
    written: int = 0


class Indexer:
    """Keeps one collection in step with a set of files. Parts are passed in, not built here."""

    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        settings: IngestSettings,
        batch_size: int = 32,
        tuned: Embedder | None = None,
        tuned_vector: str = "dense_tuned",
    ):
        self.store = store
        self.collection = store  # the generation bookkeeping (alias, embedder record) is the store's
        self.embedder = embedder
        # The fine-tuned embedder (retrieval.tuned_embedder) whose vectors every chunk also gets,
        # as the named vector tuned_vector; None: only the base vector is written.
        self.tuned = tuned
        self.tuned_vector = tuned_vector
        self.settings = settings
        self.batch_size = batch_size
        self.chunker = Chunker(embedder, settings.chunk_tokens, settings.chunk_overlap)
        self.fingerprint = pipeline_fingerprint(settings, self.chunker.id)

    # -- public ------------------------------------------------------------------------------
    def run(
        self,
        paths: Iterable[Path],
        *,
        prune: bool = False,
        dry_run: bool = False,
        reembed: bool = False,
        progress: bool = True,
        on_event: Callable[[str], None] | None = None,
        scope: str = PUBLIC_SCOPE,
    ) -> IngestReport:
        """Bring the collection in step with ``paths``. Returns what happened, per document.
        ``scope``: who may read what is written (``public``, or an upload's ``owner:<digest>``)."""
        started = time.perf_counter()
        report = IngestReport(dry_run=dry_run)
        roots = [Path(p).expanduser().absolute() for p in paths]
        notify = on_event or (lambda message: None)

        if reembed and not dry_run:
            self.collection.drop_orphans()  # left by an earlier re-embed that died
            target = self.collection.create_physical(self.embedder.info)
            stored: dict[str, StoredDocument] = {}
        else:
            if not reembed:
                self.collection.check_embedder(self.embedder.info)
            target = None if dry_run and not self.collection.exists() else (
                self.collection.physical_name() if dry_run else self.collection.ensure(self.embedder.info)
            )
            stored = self._stored_documents(target) if target and not reembed else {}

        files, failures = discover(roots, self.settings)
        report.failed.extend(failures)
        seen_doc_ids: set[str] = set()
        loaded_files: set[str] = set()
        pending: list[_Pending] = []
        cleanup: list[SourceDocument] = []  # complete current hash, leftovers of an older one
        for path in files:
            file_ok = True
            for item in load_file(path, self.settings, self.fingerprint):
                if isinstance(item, LoadFailure):
                    report.failed.append(item)
                    log.warning("failed: %s", item)
                    file_ok = False  # keep its stored documents: they may be in the unread part
                    continue
                seen_doc_ids.add(item.doc_id)
                status = self._classify(item, stored.get(item.doc_id))
                if status == "unchanged":
                    report.unchanged.append(item.source)
                    continue
                (report.added if status == "added" else report.changed).append(item.source)
                if status == "finish-cleanup":
                    cleanup.append(item)
                    continue
                if not dry_run:
                    pending.append(_Pending(item, self.chunker.split(item), replaces=item.doc_id in stored))
            if file_ok:
                loaded_files.add(str(path))

        gone = self._gone_documents(stored, roots, seen_doc_ids, loaded_files, {str(f) for f in files})
        if prune:
            report.removed.extend(sorted(stored[d].source for d in gone))
        else:
            report.stale.extend(sorted(stored[d].source for d in gone))

        if dry_run:
            report.seconds = time.perf_counter() - started
            return report

        assert target is not None
        self.prepare_tuned_vector(target, progress=progress)  # the stored points first, then new ones get both
        self._write(target, pending, report, progress, notify, scope)
        for document in cleanup:
            self._delete(target, document.doc_id, keep_hash=document.content_hash)
        if prune:
            for doc_id in gone:
                self._delete(target, doc_id)
                log.info("removed %s", stored[doc_id].source)
        if reembed:
            previous = self.collection.point_alias_at(target)
            if previous and previous != target:
                self.store.drop(previous)
                log.info("re-embedded into %s; dropped %s", target, previous)
        if report.chunks_embedded or report.removed:
            self.store.optimize()  # Qdrant Edge searches new points by brute force until this
        report.seconds = time.perf_counter() - started
        return report

    # -- the tuned embedder's vector -----------------------------------------------------------
    def prepare_tuned_vector(self, physical: str | None = None, *, fill: bool = True, progress: bool = False) -> int:
        """Bring the tuned vector of ``physical`` (default: the current generation) in step with
        ``self.tuned``: add the named vector if it is missing, and (``fill``) embed every stored chunk
        whose tuned vector is missing or was made by another adapter, from its stored text; the
        base vectors are not touched. Without ``fill`` only an empty collection is prepared (the
        chat at start-up: filling a large index is ingest's job). Returns the chunks embedded."""
        if self.tuned is None:
            return 0
        physical = physical or self.store.physical_name()
        if physical is None:
            return 0
        name, info = self.tuned_vector, self.tuned.info
        recorded = self.store.recorded_vector(name, physical)
        if recorded is not None and (recorded.embedder, recorded.dimension, recorded.complete) == (
                info.name, info.dimension, True):
            return 0
        if recorded is not None and recorded.dimension != info.dimension:
            raise StoreError(
                f"the collection's {name!r} vectors have {recorded.dimension} dimensions, but "
                f"retrieval.tuned_embedder makes {info.dimension}: rebuild with python -m ingest PATH... --reembed, "
                "or set retrieval.tuned_vector to another name"
            )
        empty = not any(True for _ in self.store.scroll(physical, fields=["doc_id"], page=1))
        if not fill and not empty:
            return 0
        if recorded is None:
            self.store.add_dense_vector(physical, name, info.dimension)
        elif recorded.embedder != info.name:
            log.info("the %s vectors were made by %s; re-embedding them with %s", name, recorded.embedder, info.name)
        # Incomplete until every point has it: a search must not trust a half-filled vector.
        self.store.record_vector(physical, name, RecordedVector(info.name, info.dimension, complete=empty))
        if empty:
            return 0
        filled = self._fill_tuned(physical, progress)
        self.store.record_vector(physical, name, RecordedVector(info.name, info.dimension, complete=True))
        self.store.optimize()
        log.info("%s: %d chunks got their %s vector from %s", physical, filled, name, info.name)
        return filled

    def _fill_tuned(self, physical: str, progress: bool) -> int:
        from tqdm.auto import tqdm

        assert self.tuned is not None
        records = [(r.id, payload_embed_text(r.payload)) for r in self.store.scroll(physical, page=_SCROLL_PAGE)]
        with tqdm(total=len(records), unit="chunk", desc=self.tuned_vector, disable=not progress,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(records), self.batch_size):
                batch = records[start:start + self.batch_size]
                vectors = self.tuned.embeddings.embed_documents([text for _, text in batch])
                self.store.set_vectors(physical, self.tuned_vector, {i: v for (i, _), v in zip(batch, vectors)})
                bar.update(len(batch))
        return len(records)

    def _untuned_points_written(self, physical: str) -> None:
        """Points written without the tuned vector (retrieval.tuned_embedder unset) make a complete
        one incomplete, so that hybrid stops searching a vector these chunks lack."""
        recorded = self.store.recorded_vector(self.tuned_vector, physical)
        if recorded is not None and recorded.complete:
            log.warning("new chunks have no %s vector (retrieval.tuned_embedder is not set): hybrid mode searches "
                        "'dense' until python -m ingest tuned-vector adds them", self.tuned_vector)
            self.store.record_vector(physical, self.tuned_vector,
                                     RecordedVector(recorded.embedder, recorded.dimension, complete=False))

    # -- state -------------------------------------------------------------------------------
    def _stored_documents(self, physical: str) -> dict[str, StoredDocument]:
        """One pass over the payloads (no vectors) to learn what each document has stored."""
        stored: dict[str, StoredDocument] = {}
        for record in self.store.scroll(physical, fields=_STATE_FIELDS, page=_SCROLL_PAGE):
            meta = record.payload.get(METADATA_KEY, {})
            if "doc_id" not in meta:
                continue
            doc = stored.setdefault(meta["doc_id"], StoredDocument(meta.get("source_file", ""), meta.get("source", "")))
            doc.points_by_hash[meta["doc_hash"]] += 1
            doc.chunk_count_by_hash[meta["doc_hash"]] = int(meta["chunk_count"])
        return stored

    @staticmethod
    def _classify(document: SourceDocument, stored: StoredDocument | None) -> str:
        if stored is None or not stored.points_by_hash:
            return "added"
        if stored.complete(document.content_hash):
            others = set(stored.points_by_hash) - {document.content_hash}
            # Complete with leftovers: an earlier run died between writing and deleting.
            return "finish-cleanup" if others else "unchanged"
        return "changed"

    @staticmethod
    def _gone_documents(
        stored: dict[str, StoredDocument],
        roots: list[Path],
        seen: set[str],
        loaded_files: set[str],
        discovered_files: set[str],
    ) -> list[str]:
        """Stored documents under the given roots whose file (or JSONL record) no longer exists."""
        gone = []
        for doc_id, doc in stored.items():
            if doc_id in seen:
                continue
            source_file = Path(doc.source_file)
            if not any(source_file == r or r in source_file.parents for r in roots):
                continue  # ingested from elsewhere: not this run's business
            if doc.source_file in discovered_files and doc.source_file not in loaded_files:
                continue  # its file exists but failed to load this time: keep what is stored
            gone.append(doc_id)
        return sorted(gone)

    # -- writing -----------------------------------------------------------------------------
    def _write(
        self, physical: str, pending: list[_Pending], report: IngestReport, progress: bool,
        notify: Callable[[str], None], scope: str,
    ) -> None:
        from tqdm.auto import tqdm

        total = sum(len(p.chunks) for p in pending)
        if not total:
            return
        notify(f"embedding {total} chunks from {len(pending)} documents")
        if self.tuned is None:
            self._untuned_points_written(physical)
        queue = [(p, c) for p in pending for c in p.chunks]
        with tqdm(total=total, unit="chunk", desc="embedding", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(queue), self.batch_size):
                batch = queue[start:start + self.batch_size]
                t0 = time.perf_counter()
                texts = [c.embed_text for _, c in batch]
                vectors = [{DENSE: v} for v in self.embedder.embeddings.embed_documents(texts)]
                if self.tuned is not None:
                    for named, tuned in zip(vectors, self.tuned.embeddings.embed_documents(texts)):
                        named[self.tuned_vector] = tuned
                report.embed_seconds += time.perf_counter() - t0
                points = [
                    StorePoint(id=self._point_id(p.document, c), vectors=v, text=c.embed_text,
                               payload=self._payload(p, c, scope))
                    for (p, c), v in zip(batch, vectors)
                ]
                self.store.upsert(physical, points)
                report.chunks_embedded += len(batch)
                bar.update(len(batch))
                for p, _ in batch:
                    p.written += 1
                    if p.written == len(p.chunks):
                        if p.replaces:
                            self._delete(physical, p.document.doc_id, keep_hash=p.document.content_hash)
                        log.info("indexed %s (%d chunks)", p.document.source, len(p.chunks))
                notify(f"embedded {report.chunks_embedded}/{total} chunks")

    def _delete(self, physical: str, doc_id: str, keep_hash: str | None = None) -> None:
        """Delete a document's points: all of them, or all but those of ``keep_hash``."""
        self.store.delete_document(physical, doc_id, keep_hash)

    @staticmethod
    def _point_id(document: SourceDocument, chunk: Chunk) -> str:
        key = f"{document.doc_id}\0{document.content_hash}\0{chunk.index}\0{chunk.text_hash}"
        return str(uuid.uuid5(_POINT_NAMESPACE, key))

    @staticmethod
    def _payload(pending: _Pending, chunk: Chunk, scope: str) -> dict[str, Any]:
        document = pending.document
        metadata = {
            **document.extra,
            **chunk.metadata,
            "doc_id": document.doc_id,
            "doc_hash": document.content_hash,
            "source_file": document.source_file,
            "source": document.source,
            "title": document.title,
            "chunk_index": chunk.index,
            "chunk_count": len(pending.chunks),
            SCOPE_KEY: scope,
        }
        return {CONTENT_KEY: chunk.text, METADATA_KEY: metadata}
