"""The ingest service: build an Indexer from ready parts. Used by the CLI and the chat UI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.embeddings import Embedder
from core.settings import Settings
from core.store import collection_for
from ingest.indexer import Indexer

if TYPE_CHECKING:
    from qdrant_client import QdrantClient


def build_indexer(settings: Settings, client: "QdrantClient", embedder: Embedder) -> Indexer:
    return Indexer(
        client=client,
        collection=collection_for(client, settings),
        embedder=embedder,
        settings=settings.ingest,
        batch_size=settings.embedding.batch_size,
    )
