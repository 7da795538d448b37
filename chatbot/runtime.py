"""The one place that builds ragtune's runtime: store, embedder, models, memory, chain, ingest.

Parts are built here and passed in by constructor; nothing else creates a client or loads a
model. Tests and benchmarks pass already-loaded parts to share them across runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.embeddings import Embedder, load_embedder
from core.llm import ChatModel, load_chat_model, resolve_adapter
from core.settings import Settings
from core.store import Collection, collection_for, open_client
from chatbot.chain import ChatModels, ConversationalRagChain, Retriever
from chatbot.identity import Identities
from chatbot.limits import QuestionLimiter
from chatbot.memory import ChatMemory
from ingest.indexer import Indexer
from ingest.service import build_indexer
from ingest.uploads import UploadService

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    client: "QdrantClient"
    embedder: Embedder
    collection: Collection
    indexer: Indexer
    memory: ChatMemory
    chain: ConversationalRagChain
    identities: Identities
    limiter: QuestionLimiter
    uploads: UploadService

    def close(self) -> None:
        self.client.close()


def build_runtime(
    settings: Settings,
    *,
    client: "QdrantClient | None" = None,
    embedder: Embedder | None = None,
    base_model: ChatModel | None = None,
) -> Runtime:
    from langchain_qdrant import QdrantVectorStore

    client = client or open_client(settings)
    embedder = embedder or load_embedder(settings.embedding)
    collection = collection_for(client, settings)
    collection.ensure(embedder.info)  # creates it empty, or fails fast on an embedder mismatch
    if base_model is not None:
        load_base = lambda: base_model  # noqa: E731 - shared by tests and benchmarks
    elif settings.llm.mode == "openai":
        load_base = lambda: load_chat_model(settings, with_adapter=False, tokenizer_only=True)  # noqa: E731
    else:
        load_base = lambda: load_chat_model(settings, with_adapter=False)  # noqa: E731
    # fail at start-up, not at the first hybrid question
    adapter = resolve_adapter(settings) if settings.llm.mode == "local" else None
    load_adapted = (lambda: load_chat_model(settings, with_adapter=True)) if adapter else None
    store = QdrantVectorStore(client=client, collection_name=settings.qdrant.collection, embedding=embedder.embeddings)
    memory = ChatMemory(settings.history_db)
    chain = ConversationalRagChain(
        settings, Retriever(store, settings), ChatModels(settings, load_base, load_adapted), memory
    )
    indexer = build_indexer(settings, client, embedder)
    return Runtime(
        settings=settings, client=client, embedder=embedder, collection=collection,
        indexer=indexer, memory=memory, chain=chain,
        identities=Identities.from_file(settings.secret_file), limiter=QuestionLimiter(settings.limits),
        uploads=UploadService(settings, indexer),
    )
