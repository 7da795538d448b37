"""Qdrant access: one client per process, and collections that know their embedder.

The name users configure (``qdrant.collection``) is a Qdrant *alias* pointing at a physical
collection ``<name>__<n>``. Each physical collection records, in Qdrant's collection metadata,
the embedder that made its vectors; opening it with another embedder fails fast instead of
mixing vector spaces. ``--reembed`` builds a new physical collection beside the old one and
switches the alias only once it is complete, so a failed re-embed loses nothing.

Points use langchain-qdrant's payload layout (``page_content`` + ``metadata``) so that
``QdrantVectorStore`` reads what ingest writes.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.embeddings import EmbedderInfo
from core.settings import Settings

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

log = logging.getLogger(__name__)

CONTENT_KEY = "page_content"
METADATA_KEY = "metadata"
_RECORD_KEY = "ragtune"
SCHEMA_VERSION = 1


class StoreError(RuntimeError):
    """Qdrant cannot be used as configured; the message says why and what to do."""


class CollectionMismatchError(StoreError):
    """The collection was embedded with another model than the one configured."""


def open_client(settings: Settings) -> "QdrantClient":
    """The process's Qdrant client: a server by URL, ':memory:', or embedded local mode."""
    from qdrant_client import QdrantClient

    location = settings.qdrant_location
    if settings.qdrant.url:
        return QdrantClient(url=location, api_key=settings.qdrant.api_key, timeout=settings.qdrant.timeout_s)
    if location == ":memory:":
        return QdrantClient(location=":memory:")
    Path(location).mkdir(parents=True, exist_ok=True)
    try:
        return QdrantClient(path=location)
    except RuntimeError as exc:
        # Local mode locks its folder; a second process (often a running chat app) fails here.
        raise StoreError(
            f"the Qdrant folder {location} is in use by another process ({exc}). Stop that process "
            "(e.g. the chat app), or run a Qdrant server and set qdrant.url (see compose.yaml)."
        ) from exc


def _record(info: EmbedderInfo) -> dict[str, Any]:
    return {_RECORD_KEY: {"embedder": info.name, "dimension": info.dimension, "schema": SCHEMA_VERSION}}


class Collection:
    """The logical collection (an alias) and the physical collection behind it."""

    def __init__(self, client: "QdrantClient", name: str, shard_number: int | None = None,
                 replication_factor: int | None = None):
        self.client = client
        self.name = name
        # Only a new physical collection takes these (a cluster's layout); None = server default.
        self.shard_number = shard_number
        self.replication_factor = replication_factor

    # -- what is there ---------------------------------------------------------------------
    def physical_name(self) -> str | None:
        """The collection the alias points at; the name itself for a plain collection."""
        for alias in self.client.get_aliases().aliases:
            if alias.alias_name == self.name:
                return alias.collection_name
        return self.name if self.client.collection_exists(self.name) else None

    def exists(self) -> bool:
        return self.physical_name() is not None

    def recorded_embedder(self, physical: str | None = None) -> EmbedderInfo | None:
        physical = physical or self.physical_name()
        if physical is None:
            return None
        info = self.client.get_collection(physical)
        record = (info.config.metadata or {}).get(_RECORD_KEY)
        if not record:
            return None
        return EmbedderInfo(name=record["embedder"], dimension=int(record["dimension"]), max_tokens=0)

    def count(self) -> int:
        return self.client.count(self.name, exact=True).count if self.exists() else 0

    # -- opening -----------------------------------------------------------------------------
    def check_embedder(self, info: EmbedderInfo) -> None:
        """Fail fast when the stored vectors come from another embedder."""
        physical = self.physical_name()
        if physical is None:
            return
        recorded = self.recorded_embedder(physical)
        if recorded is None:
            raise CollectionMismatchError(
                f"Qdrant collection {self.name!r} has no ragtune embedder record, so its vectors "
                "cannot be trusted to match. Rebuild it: python -m ingest PATH... --reembed"
            )
        if (recorded.name, recorded.dimension) != (info.name, info.dimension):
            raise CollectionMismatchError(
                f"Qdrant collection {self.name!r} was embedded with {recorded.name} "
                f"({recorded.dimension} dimensions), but embedding.model is {info.name} "
                f"({info.dimension} dimensions). Re-embed it with the new model: "
                f"python -m ingest PATH... --reembed (the old index stays until the new one is "
                f"complete), or set embedding.model back to {recorded.name}."
            )

    def ensure(self, info: EmbedderInfo) -> str:
        """Open the collection for ``info``'s vectors, creating it on first use."""
        self.check_embedder(info)
        physical = self.physical_name()
        if physical is None:
            physical = self.create_physical(info)
            self.point_alias_at(physical)
        return physical

    def create_physical(self, info: EmbedderInfo) -> str:
        from qdrant_client import models

        taken = {c.name for c in self.client.get_collections().collections}
        pattern = re.compile(rf"^{re.escape(self.name)}__(\d+)$")
        generation = 1 + max((int(m.group(1)) for n in taken if (m := pattern.match(n))), default=0)
        physical = f"{self.name}__{generation}"
        self.client.create_collection(
            physical,
            vectors_config=models.VectorParams(size=info.dimension, distance=models.Distance.COSINE),
            metadata=_record(info),
            shard_number=self.shard_number,
            replication_factor=self.replication_factor,
        )
        # Ingest filters by document on every update; a server wants an index for that. Local
        # mode accepts the call but warns that it keeps no indexes, which is fine at its scale.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            for field in ("doc_id", "source_file"):
                self.client.create_payload_index(
                    physical, f"{METADATA_KEY}.{field}", field_schema=models.PayloadSchemaType.KEYWORD
                )
        log.info("created Qdrant collection %s for %s", physical, info.name)
        return physical

    def drop_orphans(self) -> list[str]:
        """Delete ``<name>__<n>`` collections no alias points at (a re-embed that died)."""
        current = self.physical_name()
        pattern = re.compile(rf"^{re.escape(self.name)}__\d+$")
        orphans = [c.name for c in self.client.get_collections().collections
                   if pattern.match(c.name) and c.name != current]
        for name in orphans:
            self.client.delete_collection(name)
            log.info("dropped orphan collection %s", name)
        return orphans

    def point_alias_at(self, physical: str) -> str | None:
        """Atomically (re)point the alias; returns the physical collection it pointed at before."""
        from qdrant_client import models

        previous = self.physical_name()
        operations: list[Any] = []
        if previous is not None and previous != physical:
            if previous == self.name:
                raise StoreError(
                    f"{self.name!r} is a plain collection, not an alias; delete or rename it first"
                )
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.name)))
        if previous != physical:
            operations.append(
                models.CreateAliasOperation(
                    create_alias=models.CreateAlias(collection_name=physical, alias_name=self.name)
                )
            )
            self.client.update_collection_aliases(change_aliases_operations=operations)
        return previous


def collection_for(client: "QdrantClient", settings: Settings) -> Collection:
    """The configured collection, with the cluster layout settings for new physical ones."""
    return Collection(client, settings.qdrant.collection, settings.qdrant.shard_number,
                      settings.qdrant.replication_factor)
