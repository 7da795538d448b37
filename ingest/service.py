"""The ingest service: build an Indexer from ready parts. Used by the CLI and the chat UI."""

from __future__ import annotations

from core.embeddings import Embedder
from core.settings import Settings
from core.store import Store
from ingest.indexer import Indexer


def build_indexer(settings: Settings, store: Store, embedder: Embedder, tuned: Embedder | None = None) -> Indexer:
    """``tuned``: the embedder of retrieval.tuned_embedder (core.embeddings.load_tuned_embedder), whose
    vectors each chunk also gets as retrieval.tuned_vector."""
    return Indexer(store=store, embedder=embedder, settings=settings.ingest, batch_size=settings.embedding.batch_size,
                   tuned=tuned, tuned_vector=settings.retrieval.tuned_vector)
