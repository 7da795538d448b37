"""The vector store: one interface, two Qdrant backends, chosen by ``qdrant.backend``.

- ``edge`` (default): Qdrant Edge (``qdrant-edge-py``), Qdrant's own engine in-process, in a
  folder (``qdrant.path``, default ``<data_dir>/qdrant``). One process at a time.
- ``server``: a Qdrant server or cluster through qdrant-client (``qdrant.url``).

Both store the same points: the same ids, the same payload (``page_content`` + ``metadata``,
with ``metadata.scope`` saying who may read the chunk) and the same vector names: the dense
embedding as ``dense``, optionally a fine-tuned embedder's as a second named dense vector
(``retrieval.tuned_vector``, default ``dense_tuned``; its own record says which embedder made it
and whether every point has it) and a BM25 sparse vector as ``bm25``. BM25 vectors are computed here, by Qdrant
Edge's built-in ``Bm25`` for both backends, so documents and queries are tokenised the same way
whichever engine holds them; the engine applies the IDF (``Modifier.IDF``).

The name users configure (``qdrant.collection``) points at a physical generation
``<name>__<n>`` (an alias on the server, a ``current`` file in the Edge folder). Each
generation records the embedder that made its vectors; opening it with another embedder fails
fast. ``--reembed`` builds a new generation beside the old one and switches only when it is
complete, so a failed re-embed loses nothing.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.embeddings import EmbedderInfo
from core.settings import Settings

if TYPE_CHECKING:
    from qdrant_edge import Bm25

log = logging.getLogger(__name__)

CONTENT_KEY = "page_content"
METADATA_KEY = "metadata"
DENSE = "dense"  # the base embedder's vector
SPARSE = "bm25"  # the BM25 sparse vector
SCOPE_KEY = "scope"  # metadata.scope: "public" or an upload's "owner:<digest>"
PUBLIC_SCOPE = "public"
INDEXED_FIELDS = ("doc_id", "source_file", SCOPE_KEY)  # keyword payload indexes under metadata.
RECORD_KEY = "ragtune"
SCHEMA_VERSION = 2  # 2: named vectors dense + bm25, metadata.scope


class StoreError(RuntimeError):
    """The store cannot be used as configured; the message says why and what to do."""


class CollectionMismatchError(StoreError):
    """The collection was embedded with another model than the one configured."""


@dataclass
class StorePoint:
    """A chunk to write: ``text`` is what BM25 indexes (the same text the embedder read)."""

    id: str
    vectors: dict[str, list[float]]
    text: str
    payload: dict[str, Any]


@dataclass
class StoredRecord:
    id: str
    payload: dict[str, Any]
    vectors: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Hit:
    """A found chunk. ``score`` is always the cosine of the query and the chunk's dense vector,
    whatever ranked it (RRF scores are not comparable to ``retrieval.score_threshold``)."""

    id: str
    score: float
    payload: dict[str, Any]
    vector: list[float] | None = None


@dataclass
class SearchFilter:
    """Which chunks a search may return: by scope, and (fine-tuning) by document and page."""

    scopes: Sequence[str] | None = None  # None: every scope
    doc_id: str | None = None
    not_doc_id: str | None = None
    page: int | None = None


@dataclass
class RecordedVector:
    """A second named dense vector's record: the embedder that made it, and whether every point
    has it from that embedder (false while it is being filled, or after points were written
    without it): only a complete vector is searched."""

    embedder: str
    dimension: int
    complete: bool


@dataclass
class RecordedEmbedder:
    embedder: str
    dimension: int
    schema: int
    vectors: dict[str, RecordedVector] = field(default_factory=dict)  # named vectors beside dense

    def info(self) -> EmbedderInfo:
        return EmbedderInfo(name=self.embedder, dimension=self.dimension, max_tokens=0)


def parse_record(data: dict[str, Any], default_schema: int | None = None) -> RecordedEmbedder:
    """The stored record (a JSON file on Edge, collection metadata on the server) as read back."""
    vectors = {str(name): RecordedVector(str(v["embedder"]), int(v["dimension"]), bool(v["complete"]))
               for name, v in (data.get("vectors") or {}).items()}
    schema = data["schema"] if default_schema is None else data.get("schema", default_schema)
    return RecordedEmbedder(str(data["embedder"]), int(data["dimension"]), int(schema), vectors)


def record_of(info: EmbedderInfo) -> dict[str, Any]:
    return {"embedder": info.name, "dimension": info.dimension, "schema": SCHEMA_VERSION}


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


def ranked(scored: list[tuple[float, Hit]]) -> list[Hit]:
    """Hits in the engine's order, ties (RRF gives equal scores to a chunk first in one list and
    one first in the other) broken by cosine, then id: the same query always lists the same chunks."""
    return [hit for _, hit in sorted(scored, key=lambda pair: (-pair[0], -pair[1].score, pair[1].id))]


class Store(ABC):
    """One logical collection (``name``) and its physical generations ``<name>__<n>``.

    Methods taking ``physical`` act on one generation (ingest writes a new one during
    ``--reembed``); ``search`` and ``count`` read the current one."""

    def __init__(self, name: str):
        from qdrant_edge import Bm25

        self.name = name
        # Qdrant Edge's BM25 (English tokeniser, stemmer, stop words) on both backends, so that
        # documents and queries are tokenised alike wherever they are stored.
        self.bm25: "Bm25" = Bm25()

    # -- generations -----------------------------------------------------------------------
    @abstractmethod
    def physical_name(self) -> str | None:
        """The generation the name points at (None: nothing yet)."""

    @abstractmethod
    def generations(self) -> list[str]:
        """Every ``<name>__<n>`` there is, current or not."""

    @abstractmethod
    def recorded(self, physical: str) -> RecordedEmbedder | None: ...

    @abstractmethod
    def _write_vector_record(self, physical: str, name: str, record: RecordedVector) -> None:
        """Store ``record`` under ``vectors.<name>`` of the generation's embedder record."""

    @abstractmethod
    def _create(self, physical: str, info: EmbedderInfo) -> None:
        """Create an empty generation with the vectors, payload indexes and embedder record."""

    @abstractmethod
    def point_alias_at(self, physical: str) -> str | None:
        """Atomically point the name at ``physical``; returns what it pointed at before."""

    @abstractmethod
    def drop(self, physical: str) -> None: ...

    # -- data ------------------------------------------------------------------------------
    @abstractmethod
    def upsert(self, physical: str, points: list[StorePoint]) -> None:
        """Write points durably (returns when they survive a kill)."""

    @abstractmethod
    def delete_document(self, physical: str, doc_id: str, keep_hash: str | None = None) -> None:
        """Delete a document's points: all of them, or all but those of ``keep_hash``."""

    @abstractmethod
    def add_dense_vector(self, physical: str, name: str, dimension: int) -> None:
        """A second named dense vector beside ``dense`` (e.g. ``dense_tuned``, a fine-tuned
        embedder's), so that one index can be searched two ways (``retrieval.vector``)."""

    @abstractmethod
    def set_vectors(self, physical: str, name: str, vectors: dict[str, list[float]]) -> None:
        """Set the named vector of existing points (point id -> vector); payloads stay."""

    @abstractmethod
    def scroll(self, physical: str, fields: Sequence[str] | None = None, with_vectors: bool = False,
               page: int = 1024) -> Iterator[StoredRecord]:
        """Every point's payload (``fields``: only these ``metadata.`` keys), optionally vectors."""

    @abstractmethod
    def count(self, where: SearchFilter | None = None) -> int: ...

    @abstractmethod
    def search(self, vector: list[float], text: str | None, k: int, *, mode: str = "dense",
               where: SearchFilter | None = None, using: str = DENSE, candidates: int = 20,
               hnsw_ef: int | None = None, with_vectors: bool = False, exact: bool = False,
               score_by: tuple[str, list[float]] | None = None) -> list[Hit]:
        """Top ``k`` ranked by ``mode``: 'dense' (``vector`` on the named vector ``using``),
        'sparse' (BM25 on ``text``) or 'fused' (both, each side prefetching ``candidates``,
        merged by RRF). Each hit's score is its dense cosine with ``vector`` whatever ranked it,
        or with ``score_by``'s (vector name, query vector) when given: a search that ranks by the
        tuned vector still scores by the base one, which the threshold and decline were fitted on.
        ``exact``: search the dense vectors without the HNSW index (the benchmark's ground truth)."""

    def optimize(self) -> None:
        """Build the search indexes now (Edge: HNSW); the server does this itself."""

    def close(self) -> None:
        """Release the store (Edge: its folder lock)."""

    # -- shared logic ----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.physical_name() is not None

    def recorded_embedder(self, physical: str | None = None) -> EmbedderInfo | None:
        physical = physical or self.physical_name()
        record = self.recorded(physical) if physical else None
        return record.info() if record else None

    def check_embedder(self, info: EmbedderInfo) -> None:
        """Fail fast when the stored vectors come from another embedder."""
        physical = self.physical_name()
        if physical is None:
            return
        record = self.recorded(physical)
        if record is None:
            raise CollectionMismatchError(
                f"collection {self.name!r} has no ragtune embedder record, so its vectors cannot be "
                "trusted to match. Rebuild it: python -m ingest PATH... --reembed"
            )
        if (record.embedder, record.dimension) != (info.name, info.dimension):
            raise CollectionMismatchError(
                f"collection {self.name!r} was embedded with {record.embedder} "
                f"({record.dimension} dimensions), but embedding.model is {info.name} "
                f"({info.dimension} dimensions). Re-embed it with the new model: "
                f"python -m ingest PATH... --reembed (the old index stays until the new one is "
                f"complete), or set embedding.model back to {record.embedder}."
            )
        if record.schema < SCHEMA_VERSION:
            raise StoreError(
                f"collection {self.name!r} was written by an older ragtune (no BM25 vectors or scopes). "
                "Move it: python -m ingest migrate (nothing is dropped), or rebuild: python -m ingest PATH... --reembed"
            )

    def recorded_vector(self, name: str, physical: str | None = None) -> RecordedVector | None:
        physical = physical or self.physical_name()
        record = self.recorded(physical) if physical else None
        return record.vectors.get(name) if record else None

    def record_vector(self, physical: str, name: str, record: RecordedVector) -> None:
        self._write_vector_record(physical, name, record)

    def vector_state(self, name: str, info: EmbedderInfo) -> str:
        """'ready' (every point has ``name`` from ``info``'s embedder), 'missing' (no such vector),
        'stale' (made by another embedder: a retrained adapter) or 'incomplete' (points without it)."""
        recorded = self.recorded_vector(name)
        if recorded is None:
            return "missing"
        if (recorded.embedder, recorded.dimension) != (info.name, info.dimension):
            return "stale"
        return "ready" if recorded.complete else "incomplete"

    def ensure(self, info: EmbedderInfo) -> str:
        """Open the collection for ``info``'s vectors, creating it on first use."""
        self.check_embedder(info)
        physical = self.physical_name()
        if physical is None:
            physical = self.create_physical(info)
            self.point_alias_at(physical)
        return physical

    def create_physical(self, info: EmbedderInfo) -> str:
        pattern = re.compile(rf"^{re.escape(self.name)}__(\d+)$")
        generation = 1 + max((int(m.group(1)) for n in self.generations() if (m := pattern.match(n))), default=0)
        physical = f"{self.name}__{generation}"
        self._create(physical, info)
        log.info("created collection %s for %s", physical, info.name)
        return physical

    def drop_orphans(self) -> list[str]:
        """Delete generations nothing points at (a re-embed that died)."""
        current = self.physical_name()
        orphans = [g for g in self.generations() if g != current]
        for physical in orphans:
            self.drop(physical)
            log.info("dropped orphan collection %s", physical)
        return orphans


def store_backend(settings: Settings) -> str:
    return settings.qdrant.backend or ("server" if settings.qdrant.url else "edge")


def open_store(settings: Settings, collection: str | None = None) -> Store:
    """The configured store for ``qdrant.collection`` (or ``collection``)."""
    name = collection or settings.qdrant.collection
    match store_backend(settings):
        case "edge":
            try:
                from core.store_edge import EdgeStore
            except ImportError as exc:
                raise StoreError(f"qdrant.backend=edge needs qdrant-edge-py: pip install qdrant-edge-py==0.9.0 ({exc})") from exc
            return EdgeStore.open(settings.qdrant_location, name)
        case "server":
            try:
                from core.store_server import ServerStore
            except ImportError as exc:
                raise StoreError(f"qdrant.backend=server needs qdrant-client: pip install qdrant-client ({exc})") from exc
            return ServerStore.connect(settings, name)
    raise StoreError(f"unknown qdrant.backend {settings.qdrant.backend!r}")  # pragma: no cover - settings validate it
