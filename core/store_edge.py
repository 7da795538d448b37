"""The embedded store: Qdrant Edge (``qdrant-edge-py``), Qdrant's own engine in this process.

Folder layout, under ``qdrant.path`` (default ``<data_dir>/qdrant``)::

    <collection>/.lock            held (flock) by the one process that has the collection open
    <collection>/current          the generation the name points at ("<collection>__2"); replaced atomically
    <collection>/<generation>/    an EdgeShard (segments, WAL)
    <collection>/<generation>.json  the embedder record of that generation

Qdrant Edge allows one process per shard folder. A second process would fail deep inside
``EdgeShard.load`` (and a second load inside one process broke the first shard's flush when
tried with 0.9.0), so the lock is taken first and a second opener gets a ``StoreError`` that
says what to do instead of a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.embeddings import EmbedderInfo
from core.store import (
    DENSE, INDEXED_FIELDS, METADATA_KEY, SCOPE_KEY, SPARSE, Hit, RecordedEmbedder, RecordedVector, SearchFilter,
    Store, StoreError, StorePoint, StoredRecord, cosine, parse_record, ranked, record_of,
)

if TYPE_CHECKING:
    from qdrant_edge import EdgeShard

log = logging.getLogger(__name__)

RRF_K = 60  # reciprocal rank fusion's constant, the same on both backends
_CURRENT = "current"
_LOCK = ".lock"


def in_use_message(folder: Path) -> str:
    return (
        f"the store {folder} is open in another process (often the chat app): Qdrant Edge allows one "
        "process at a time. Add documents through the app's upload instead, stop that process and run "
        "this again, or run a Qdrant server and set qdrant.url (see compose.yaml) so that both can use it."
    )


def is_local_mode_folder(folder: Path) -> bool:
    """A folder written by qdrant-client's local mode (the store before Qdrant Edge)."""
    return (folder / "meta.json").is_file() and (folder / "collection").is_dir()


class EdgeStore(Store):
    def __init__(self, folder: Path, name: str, lock_fd: int, temporary: Path | None = None):
        super().__init__(name)
        self.folder = folder
        self._lock_fd: int | None = lock_fd
        self._temporary = temporary
        self._shards: dict[str, "EdgeShard"] = {}

    @classmethod
    def open(cls, location: str, name: str) -> "EdgeStore":
        temporary = None
        if location == ":memory:":
            temporary = Path(tempfile.mkdtemp(prefix="ragtune-edge-"))
            root = temporary
        else:
            root = Path(location).expanduser()
        if is_local_mode_folder(root):
            raise StoreError(
                f"{root} holds an index written by qdrant-client's local mode (the store before Qdrant Edge). "
                "Move it into the new store with: python -m ingest migrate (nothing is dropped; the old "
                "folder is kept aside)."
            )
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(in_use_message(folder)) from exc
            raise
        return cls(folder, name, fd, temporary)

    # -- generations -----------------------------------------------------------------------
    def physical_name(self) -> str | None:
        current = self.folder / _CURRENT
        if not current.is_file():
            return None
        physical = current.read_text(encoding="utf-8").strip()
        return physical if (self.folder / physical).is_dir() else None

    def generations(self) -> list[str]:
        prefix = f"{self.name}__"
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and p.name.startswith(prefix))

    def recorded(self, physical: str) -> RecordedEmbedder | None:
        file = self.folder / f"{physical}.json"
        if not file.is_file():
            return None
        try:
            return parse_record(json.loads(file.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"{file}: unreadable embedder record ({exc}); rebuild with --reembed") from exc

    def _write_vector_record(self, physical: str, name: str, record: RecordedVector) -> None:
        file = self.folder / f"{physical}.json"
        data = json.loads(file.read_text(encoding="utf-8"))
        data.setdefault("vectors", {})[name] = asdict(record)
        _write_atomically(file, json.dumps(data))

    def _create(self, physical: str, info: EmbedderInfo) -> None:
        from qdrant_edge import (
            Distance, EdgeConfig, EdgeShard, EdgeSparseVectorParams, EdgeVectorParams, Modifier,
            PayloadSchemaType, UpdateOperation,
        )

        config = EdgeConfig(
            vectors={DENSE: EdgeVectorParams(size=info.dimension, distance=Distance.Cosine)},
            sparse_vectors={SPARSE: EdgeSparseVectorParams(modifier=Modifier.Idf)},
        )
        shard = EdgeShard.create(str(self.folder / physical), config)
        for name in INDEXED_FIELDS:
            shard.update(UpdateOperation.create_field_index(f"{METADATA_KEY}.{name}", PayloadSchemaType.Keyword))
        shard.flush()
        self._shards[physical] = shard
        _write_atomically(self.folder / f"{physical}.json", json.dumps(record_of(info)))

    def point_alias_at(self, physical: str) -> str | None:
        previous = self.physical_name()
        if previous != physical:
            self._shard(physical).flush()  # everything in it is on disk before readers are sent to it
            _write_atomically(self.folder / _CURRENT, physical)
        return previous

    def drop(self, physical: str) -> None:
        shard = self._shards.pop(physical, None)
        if shard is not None:
            shard.close()
        (self.folder / f"{physical}.json").unlink(missing_ok=True)
        shutil.rmtree(self.folder / physical, ignore_errors=True)

    def _shard(self, physical: str) -> "EdgeShard":
        if self._lock_fd is None:
            raise StoreError(f"the store {self.folder} is closed")
        shard = self._shards.get(physical)
        if shard is None:
            from qdrant_edge import EdgeShard

            path = self.folder / physical
            if not path.is_dir():
                raise StoreError(f"collection generation {path} does not exist")
            try:
                shard = EdgeShard.load(str(path))
            except Exception as exc:  # qdrant_edge raises plain Exception
                if "WouldBlock" in str(exc):
                    raise StoreError(in_use_message(self.folder)) from exc
                raise StoreError(f"Qdrant Edge could not open {path}: {exc}") from exc
            self._shards[physical] = shard
        return shard

    def _current(self) -> "EdgeShard | None":
        physical = self.physical_name()
        return self._shard(physical) if physical else None

    # -- data ------------------------------------------------------------------------------
    def upsert(self, physical: str, points: list[StorePoint]) -> None:
        from qdrant_edge import Point, UpdateOperation

        if not points:
            return
        shard = self._shard(physical)
        shard.update(UpdateOperation.upsert_points([
            Point(p.id, {**p.vectors, SPARSE: self.bm25.embed_document(p.text)}, p.payload) for p in points
        ]))  # in the WAL when update returns: a kill -9 after this loses nothing

    def delete_document(self, physical: str, doc_id: str, keep_hash: str | None = None) -> None:
        from qdrant_edge import FieldCondition, Filter, MatchValue, UpdateOperation

        must_not = [FieldCondition(key=f"{METADATA_KEY}.doc_hash", match=MatchValue(keep_hash))] if keep_hash else None
        selector = Filter(must=[FieldCondition(key=f"{METADATA_KEY}.doc_id", match=MatchValue(doc_id))],
                          must_not=must_not)
        self._shard(physical).update(UpdateOperation.delete_points_by_filter(selector))

    def add_dense_vector(self, physical: str, name: str, dimension: int) -> None:
        from qdrant_edge import Distance, UpdateOperation

        self._shard(physical).update(UpdateOperation.create_dense_vector(name, dimension, Distance.Cosine))

    def set_vectors(self, physical: str, name: str, vectors: dict[str, list[float]]) -> None:
        from qdrant_edge import PointVectors, UpdateOperation

        self._shard(physical).update(UpdateOperation.update_vectors(
            [PointVectors(point_id, {name: vector}) for point_id, vector in vectors.items()]))

    def scroll(self, physical: str, fields: Sequence[str] | None = None, with_vectors: bool = False,
               page: int = 1024) -> Iterator[StoredRecord]:
        from qdrant_edge import ScrollRequest

        shard = self._shard(physical)
        payload: Any = [f"{METADATA_KEY}.{f}" for f in fields] if fields is not None else True
        offset = None
        while True:
            records, offset = shard.scroll(ScrollRequest(offset=offset, limit=page, with_payload=payload,
                                                         with_vector=True if with_vectors else False))
            for record in records:
                vectors = {k: list(v) for k, v in (record.vector or {}).items() if k != SPARSE} if with_vectors else {}
                yield StoredRecord(str(record.id), record.payload or {}, vectors)
            if offset is None:
                return

    def count(self, where: SearchFilter | None = None) -> int:
        from qdrant_edge import CountRequest

        shard = self._current()
        return shard.count(CountRequest(exact=True, filter=_filter(where))) if shard else 0

    def search(self, vector: list[float], text: str | None, k: int, *, mode: str = "dense",
               where: SearchFilter | None = None, using: str = DENSE, candidates: int = 20,
               hnsw_ef: int | None = None, with_vectors: bool = False, exact: bool = False,
               score_by: tuple[str, list[float]] | None = None) -> list[Hit]:
        from qdrant_edge import Fusion, Prefetch, Query, QueryRequest, SearchParams

        shard = self._current()
        if shard is None:
            return []
        params = SearchParams(hnsw_ef=hnsw_ef, exact=exact) if hnsw_ef or exact else None
        query_filter = _filter(where)
        dense = Query.Nearest(vector, using=using)
        score_name, score_vector = score_by or (using, vector)
        read = list(dict.fromkeys([using, score_name]))
        if mode == "dense" or not text:
            request = QueryRequest(limit=k, query=dense, filter=query_filter, params=params,
                                   with_payload=True, with_vector=read)
        elif mode == "sparse":
            request = QueryRequest(limit=k, query=Query.Nearest(self.bm25.embed_query(text), using=SPARSE),
                                   filter=query_filter, with_payload=True, with_vector=read)
        else:
            request = QueryRequest(
                limit=k, query=Fusion.Rrf(k=RRF_K), filter=query_filter, with_payload=True, with_vector=read,
                prefetches=[
                    Prefetch(limit=max(candidates, k), query=dense, params=params, filter=query_filter),
                    Prefetch(limit=max(candidates, k), query=Query.Nearest(self.bm25.embed_query(text), using=SPARSE),
                             filter=query_filter),
                ],
            )
        hits = []
        for point in shard.query(request):
            stored = list((point.vector or {}).get(using) or [])
            if (mode == "dense" or not text) and score_name == using:
                score = point.score
            else:
                score = cosine(score_vector, list((point.vector or {}).get(score_name) or []))
            hits.append((round(point.score, 6), Hit(str(point.id), float(score), point.payload or {},
                                                    stored if with_vectors else None)))
        return ranked(hits)

    def optimize(self) -> None:
        shard = self._current()
        if shard is not None:
            shard.optimize()
            shard.flush()

    def close(self) -> None:
        for shard in self._shards.values():
            try:
                shard.flush()
            finally:
                shard.close()
        self._shards.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


def _filter(where: SearchFilter | None) -> Any:
    from qdrant_edge import FieldCondition, Filter, MatchAny, MatchValue

    if where is None:
        return None
    must: list[Any] = []
    must_not: list[Any] = []
    if where.scopes is not None:
        must.append(FieldCondition(key=f"{METADATA_KEY}.{SCOPE_KEY}", match=MatchAny(list(where.scopes))))
    if where.doc_id is not None:
        must.append(FieldCondition(key=f"{METADATA_KEY}.doc_id", match=MatchValue(where.doc_id)))
    if where.page is not None:
        must.append(FieldCondition(key=f"{METADATA_KEY}.page", match=MatchValue(where.page)))
    if where.not_doc_id is not None:
        must_not.append(FieldCondition(key=f"{METADATA_KEY}.doc_id", match=MatchValue(where.not_doc_id)))
    if not must and not must_not:
        return None
    return Filter(must=must or None, must_not=must_not or None)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
