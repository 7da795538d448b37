"""The one place that builds ragtune's runtime: store, embedder, models, memory, chain, ingest.

Parts are built here and passed in by constructor; nothing else creates a client or picks a
generation backend. Tests and benchmarks pass already-loaded parts to share them across runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core.embeddings import Embedder, load_embedder, load_tuned_embedder
from core.decline import public_terms
from core.evidence import EvidenceSelector
from core.generation import GenerationBackend, build_backend
from core.settings import Settings
from core.store import Store, open_store
from chatbot.chain import ConversationalRagChain
from core.retrieval import mode_retrievers
from chatbot.identity import Identities
from chatbot.limits import QuestionLimiter
from chatbot.memory import ChatMemory
from ingest.indexer import Indexer
from ingest.service import build_indexer
from ingest.uploads import UploadService

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    store: Store
    embedder: Embedder
    tuned_embedder: Embedder | None  # retrieval.tuned_embedder: hybrid's retrieval, a second vector per chunk
    indexer: Indexer
    memory: ChatMemory
    chain: ConversationalRagChain
    identities: Identities
    limiter: QuestionLimiter
    uploads: UploadService
    generation: GenerationBackend
    owns_generation: bool = True  # False when the caller passed the backend in (and closes it)
    owns_store: bool = True  # likewise for the store

    def refresh_knowledge_base_terms(self) -> None:
        """Re-read the public chunks' terms (core.decline.public_terms) after an ingest of public
        documents (the first start's demo corpus); uploads are private and never change them."""
        self.chain.knowledge_base = public_terms(self.store)

    def close(self) -> None:
        if self.owns_store:
            self.store.close()
        if self.owns_generation:
            self.generation.close()


def build_runtime(
    settings: Settings,
    *,
    store: Store | None = None,
    embedder: Embedder | None = None,
    generation: GenerationBackend | None = None,
    tuned_embedder: Embedder | None = None,
) -> Runtime:
    """Build what is not passed in. ``generation``: a backend to share (tests, benchmarks); it
    must have been built from these settings' ``llm`` section. ``store``: an open store to use
    (the caller closes it). ``tuned_embedder``: retrieval.tuned_embedder already loaded (loaded
    here when that setting is set and none is passed)."""
    owns_generation = generation is None
    # Loads no weights yet (the app answers /healthz while they load), but a missing GGUF or
    # adapter fails here, at start-up, not at the first question.
    generation = generation or build_backend(settings)
    owns_store = store is None
    store = store or open_store(settings)
    embedder = embedder or load_embedder(settings.embedding)
    store.ensure(embedder.info)  # creates it empty, or fails fast on an embedder mismatch
    if tuned_embedder is None and settings.retrieval.tuned_embedder:
        tuned_embedder = load_tuned_embedder(settings, embedder)
    indexer = build_indexer(settings, store, embedder, tuned_embedder)
    # An empty collection gets the tuned vector now, so that the first ingest (the demo corpus)
    # writes both; a stored one without it is ingest's to fill (hybrid searches "dense" till then).
    indexer.prepare_tuned_vector(fill=False)
    memory = ChatMemory(settings.history_db)
    evidence = EvidenceSelector(embedder.embeddings, settings.retrieval.evidence)
    retrievers = mode_retrievers(store, embedder, tuned_embedder, settings)
    chain = ConversationalRagChain(settings, retrievers["rag"], generation, memory, evidence, retrievers=retrievers,
                                   knowledge_base=public_terms(store))
    return Runtime(
        settings=settings, store=store, embedder=embedder, tuned_embedder=tuned_embedder,
        indexer=indexer, memory=memory, chain=chain,
        identities=Identities.from_file(settings.secret_file), limiter=QuestionLimiter(settings.limits),
        uploads=UploadService(settings, indexer),
        generation=generation, owns_generation=owns_generation, owns_store=owns_store,
    )
