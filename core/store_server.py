"""The store on a Qdrant server or cluster, through qdrant-client (``qdrant.url``).

The same points as the embedded store: ids, payloads, the named dense vector ``dense`` and the
BM25 sparse vector ``bm25`` (computed by the shared ``Bm25`` model, the server applies the IDF).
The name is a Qdrant alias on the physical generation ``<name>__<n>``, whose collection
metadata holds the embedder record.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from core.embeddings import EmbedderInfo
from core.settings import Settings
from core.store import (
    DENSE, INDEXED_FIELDS, METADATA_KEY, RECORD_KEY, SCOPE_KEY, SPARSE, Hit, RecordedEmbedder, RecordedVector,
    SearchFilter, Store, StoreError, StorePoint, StoredRecord, cosine, parse_record, ranked, record_of,
)
from core.store_edge import RRF_K

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

log = logging.getLogger(__name__)


class ServerStore(Store):
    def __init__(self, client: "QdrantClient", name: str, shard_number: int | None = None,
                 replication_factor: int | None = None):
        super().__init__(name)
        self.client = client
        # Only a new generation takes these (a cluster's layout); None = the server's default.
        self.shard_number = shard_number
        self.replication_factor = replication_factor

    @classmethod
    def connect(cls, settings: Settings, name: str) -> "ServerStore":
        from qdrant_client import QdrantClient

        client = QdrantClient(url=settings.qdrant.url, api_key=settings.qdrant.api_key,
                              timeout=settings.qdrant.timeout_s)
        try:
            client.get_collections()
        except Exception as exc:  # connection refused, bad API key, TLS: all say the same to the user
            client.close()
            raise StoreError(f"the Qdrant server at {settings.qdrant.url} cannot be used: {exc}") from exc
        return cls(client, name, settings.qdrant.shard_number, settings.qdrant.replication_factor)

    # -- generations -----------------------------------------------------------------------
    def physical_name(self) -> str | None:
        for alias in self.client.get_aliases().aliases:
            if alias.alias_name == self.name:
                return alias.collection_name
        return self.name if self.client.collection_exists(self.name) else None

    def generations(self) -> list[str]:
        pattern = re.compile(rf"^{re.escape(self.name)}__\d+$")
        return sorted(c.name for c in self.client.get_collections().collections if pattern.match(c.name))

    def recorded(self, physical: str) -> RecordedEmbedder | None:
        record = (self.client.get_collection(physical).config.metadata or {}).get(RECORD_KEY)
        if not record:
            return None
        return parse_record(record, default_schema=1)

    def _write_vector_record(self, physical: str, name: str, record: RecordedVector) -> None:
        current = dict((self.client.get_collection(physical).config.metadata or {}).get(RECORD_KEY) or {})
        current["vectors"] = {**(current.get("vectors") or {}), name: asdict(record)}
        self.client.update_collection(physical, metadata={RECORD_KEY: current})

    def _create(self, physical: str, info: EmbedderInfo) -> None:
        from qdrant_client import models

        self.client.create_collection(
            physical,
            vectors_config={DENSE: models.VectorParams(size=info.dimension, distance=models.Distance.COSINE)},
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
            metadata={RECORD_KEY: record_of(info)},
            shard_number=self.shard_number,
            replication_factor=self.replication_factor,
        )
        for field in INDEXED_FIELDS:
            self.client.create_payload_index(physical, f"{METADATA_KEY}.{field}",
                                             field_schema=models.PayloadSchemaType.KEYWORD)

    def point_alias_at(self, physical: str) -> str | None:
        from qdrant_client import models

        previous = self.physical_name()
        if previous == physical:
            return previous
        operations: list[Any] = []
        if previous is not None:
            if previous == self.name:
                raise StoreError(f"{self.name!r} is a plain collection, not an alias; delete or rename it first")
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.name)))
        operations.append(models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=physical, alias_name=self.name)))
        self.client.update_collection_aliases(change_aliases_operations=operations)
        return previous

    def drop(self, physical: str) -> None:
        self.client.delete_collection(physical)

    # -- data ------------------------------------------------------------------------------
    def upsert(self, physical: str, points: list[StorePoint]) -> None:
        from qdrant_client import models

        if not points:
            return
        structs = []
        for p in points:
            sparse = self.bm25.embed_document(p.text)
            vectors: dict[str, Any] = {**p.vectors, SPARSE: models.SparseVector(indices=sparse.indices,
                                                                                  values=sparse.values)}
            structs.append(models.PointStruct(id=p.id, vector=vectors, payload=p.payload))
        self.client.upsert(physical, points=structs, wait=True)

    def delete_document(self, physical: str, doc_id: str, keep_hash: str | None = None) -> None:
        from qdrant_client import models

        def field_is(name: str, value: str) -> Any:
            return models.FieldCondition(key=f"{METADATA_KEY}.{name}", match=models.MatchValue(value=value))

        selector = models.Filter(must=[field_is("doc_id", doc_id)],
                                 must_not=[field_is("doc_hash", keep_hash)] if keep_hash else None)
        self.client.delete(physical, points_selector=models.FilterSelector(filter=selector), wait=True)

    def add_dense_vector(self, physical: str, name: str, dimension: int) -> None:
        from qdrant_client import models

        self.client.create_vector_name(physical, name, models.DenseVectorNameConfig(
            dense=models.DenseVectorConfig(size=dimension, distance=models.Distance.COSINE)))

    def set_vectors(self, physical: str, name: str, vectors: dict[str, list[float]]) -> None:
        from qdrant_client import models

        self.client.update_vectors(physical, points=[models.PointVectors(id=point_id, vector={name: vector})
                                                     for point_id, vector in vectors.items()], wait=True)

    def scroll(self, physical: str, fields: Sequence[str] | None = None, with_vectors: bool = False,
               page: int = 1024) -> Iterator[StoredRecord]:
        payload: Any = [f"{METADATA_KEY}.{f}" for f in fields] if fields is not None else True
        offset = None
        while True:
            records, offset = self.client.scroll(physical, limit=page, offset=offset, with_payload=payload,
                                                 with_vectors=True if with_vectors else False)
            for record in records:
                vectors = record.vector if isinstance(record.vector, dict) else {}
                yield StoredRecord(str(record.id), record.payload or {},
                                   {k: list(v) for k, v in vectors.items() if k != SPARSE} if with_vectors else {})
            if offset is None:
                return

    def count(self, where: SearchFilter | None = None) -> int:
        if not self.exists():
            return 0
        return self.client.count(self.name, count_filter=_filter(where), exact=True).count

    def search(self, vector: list[float], text: str | None, k: int, *, mode: str = "dense",
               where: SearchFilter | None = None, using: str = DENSE, candidates: int = 20,
               hnsw_ef: int | None = None, with_vectors: bool = False, exact: bool = False,
               score_by: tuple[str, list[float]] | None = None) -> list[Hit]:
        from qdrant_client import models

        if not self.exists():
            return []
        score_name, score_vector = score_by or (using, vector)
        read = list(dict.fromkeys([using, score_name]))
        params = models.SearchParams(hnsw_ef=hnsw_ef, exact=exact) if hnsw_ef or exact else None
        query_filter = _filter(where)
        if mode == "dense" or not text:
            response = self.client.query_points(self.name, query=vector, using=using, query_filter=query_filter,
                                                search_params=params, limit=k, with_payload=True,
                                                with_vectors=read)
        else:
            sparse = self.bm25.embed_query(text)
            sparse_query = models.SparseVector(indices=sparse.indices, values=sparse.values)
            if mode == "sparse":
                response = self.client.query_points(self.name, query=sparse_query, using=SPARSE,
                                                    query_filter=query_filter, limit=k, with_payload=True,
                                                    with_vectors=read)
            else:
                response = self.client.query_points(
                    self.name, limit=k, query=models.RrfQuery(rrf=models.Rrf(k=RRF_K)), query_filter=query_filter,
                    prefetch=[
                        models.Prefetch(query=vector, using=using, limit=max(candidates, k), params=params,
                                        filter=query_filter),
                        models.Prefetch(query=sparse_query, using=SPARSE, limit=max(candidates, k),
                                        filter=query_filter),
                    ],
                    with_payload=True, with_vectors=read,
                )
        hits = []
        for point in response.points:
            vectors = point.vector if isinstance(point.vector, dict) else {}
            stored = list(vectors.get(using) or [])
            if (mode == "dense" or not text) and score_name == using:
                score = point.score
            else:
                score = cosine(score_vector, list(vectors.get(score_name) or []))
            hits.append((round(point.score, 6), Hit(str(point.id), float(score), point.payload or {},
                                                    stored if with_vectors else None)))
        return ranked(hits)

    def close(self) -> None:
        self.client.close()


def _filter(where: SearchFilter | None) -> Any:
    from qdrant_client import models

    if where is None:
        return None

    def field_is(name: str, value: Any) -> Any:
        return models.FieldCondition(key=f"{METADATA_KEY}.{name}", match=models.MatchValue(value=value))

    must: list[Any] = []
    if where.scopes is not None:
        must.append(models.FieldCondition(key=f"{METADATA_KEY}.{SCOPE_KEY}", match=models.MatchAny(any=list(where.scopes))))
    if where.doc_id is not None:
        must.append(field_is("doc_id", where.doc_id))
    if where.page is not None:
        must.append(field_is("page", where.page))
    must_not = [field_is("doc_id", where.not_doc_id)] if where.not_doc_id is not None else []
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)
