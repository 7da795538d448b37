"""The one retriever: the chat, fine-tuning data and evals all get their chunks here.

``Retriever.retrieve`` embeds the query, searches the store (``retrieval.method``: dense,
BM25 or both fused by RRF, on the named vector ``retrieval.vector``), restricted to the scopes
the caller may read, applies MMR and the score threshold from ``retrieval`` settings and returns
numbered ``Source`` records (the number is the [n] the prompt gives the chunk). The threshold
always reads the chunk's dense cosine, whatever ranked it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from core.prompts import ContextChunk
from core.settings import RetrievalSettings, Settings
from core.modes import RETRIEVING_MODES, TUNED_RETRIEVAL_MODES, Mode
from core.store import CONTENT_KEY, DENSE, METADATA_KEY, Hit, SearchFilter, Store

if TYPE_CHECKING:
    from core.embeddings import Embedder

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One retrieved chunk as shown beside an answer."""

    n: int  # the number the prompt gave it: [n] in the answer
    title: str
    source: str
    text: str
    score: float
    page: int | None = None
    section: str | None = None
    cited: bool = False
    evidence: list[str] = field(default_factory=list)  # its units the answer rests on (highlighted)
    supersedes: list[str] = field(default_factory=list)  # documents its own replaces (front matter)
    superseded_by: str | None = None  # set when a newer retrieved document replaces this one


def chunk_of(hit: Hit) -> ContextChunk:
    return ContextChunk.from_metadata(str(hit.payload.get(CONTENT_KEY, "")), hit.payload.get(METADATA_KEY) or {})


def source_of(hit: Hit, n: int) -> Source:
    """A hit as a numbered source, with the documents its own supersedes (front matter)."""
    shown = {k: v for k, v in asdict(chunk_of(hit)).items() if k != "n"}
    metadata = hit.payload.get(METADATA_KEY) or {}
    return Source(n=n, score=round(hit.score, 4), **shown, supersedes=list(metadata.get("supersedes") or []))


class Retriever:
    """Search through the store interface, with k / method / MMR / score threshold from settings.

    ``scorer``: the base embedder, when ``embedder`` is the tuned one and ``retrieval.vector`` its
    named vector: the tuned vectors rank the chunks, and each hit is still scored by the base
    embedder's cosine on ``dense``, the scale retrieval.score_threshold and the decline model were
    fitted on."""

    def __init__(self, store: Store, embedder: "Embedder", settings: Settings | RetrievalSettings,
                 scorer: "Embedder | None" = None):
        self.store = store
        self.embedder = embedder
        self.settings = settings.retrieval if isinstance(settings, Settings) else settings
        self.scorer = scorer

    def with_settings(self, **changes: object) -> "Retriever":
        """The same store and embedders with some retrieval settings changed (evals: a wider k)."""
        return Retriever(self.store, self.embedder, self.settings.model_copy(update=changes), self.scorer)

    def embed(self, queries: Sequence[str]) -> list[list[float]]:
        # embed_documents batches; HuggingFaceEmbeddings encodes queries with the same options.
        return self.embedder.embeddings.embed_documents(list(queries))

    def retrieve(self, query: str, scopes: Sequence[str] | None = None) -> list[Source]:
        """The chunks for ``query`` the chat shows. ``scopes``: the scopes the asker may read
        (``["public", UploadService.scope_for(owner)]``); None reads every scope."""
        hits = self.hits(query, where=SearchFilter(scopes=scopes) if scopes is not None else None)
        return [source_of(hit, n) for n, hit in enumerate(hits, 1)]

    def hits(self, query: str, vector: list[float] | None = None, *, where: SearchFilter | None = None,
             k: int | None = None, threshold: bool = True) -> list[Hit]:
        """The ranked hits behind ``retrieve`` (fine-tuning passes its own ``vector`` and filters)."""
        s = self.settings
        k = k or s.k
        if vector is None:
            vector = self.embedder.embeddings.embed_query(query)
        mmr = s.search == "mmr"
        # More than k when BM25 ranks: a word match whose cosine fails the threshold must leave
        # room for the next chunk, not shorten the list.
        limit = max(s.fetch_k, k) if mmr else (k if s.method == "dense" else max(s.candidates, k))
        score_by = (DENSE, self.scorer.embeddings.embed_query(query)) if self.scorer is not None else None
        found = self.store.search(
            vector, query, limit, mode=s.method, where=where, using=s.vector,
            candidates=s.candidates, hnsw_ef=s.hnsw_ef, with_vectors=mmr, score_by=score_by,
        )
        if mmr and found:
            from langchain_core.vectorstores.utils import maximal_marginal_relevance
            import numpy as np

            order = maximal_marginal_relevance(np.array(vector), [h.vector for h in found], lambda_mult=s.mmr_lambda, k=k)
            found = [found[i] for i in order]
        if threshold and s.score_threshold is not None:
            found = [h for h in found if h.score >= s.score_threshold]
        return found[:k]


def tuned_retriever(store: Store, embedder: "Embedder", tuned: "Embedder | None",
                    settings: Settings) -> Retriever | None:
    """The retriever on the tuned embedder's vector, or None (with a warning saying what to run)
    when none is configured or the collection's tuned vector is missing, stale or incomplete."""
    if tuned is None:
        return None
    name = settings.retrieval.tuned_vector
    state = store.vector_state(name, tuned.info)
    if state != "ready":
        why = {"missing": "has no", "stale": "has another adapter's", "incomplete": "has an incomplete"}[state]
        log.warning("the collection %r %s %r vector (retrieval.tuned_embedder is %s): hybrid searches 'dense' "
                    "instead. Add it with: python -m ingest tuned-vector", store.name, why, name, tuned.info.name)
        return None
    return Retriever(store, tuned, settings.retrieval.model_copy(update={"vector": name}), scorer=embedder)


def mode_retrievers(store: Store, embedder: "Embedder", tuned: "Embedder | None",
                    settings: Settings) -> dict[Mode, Retriever]:
    """Which retriever each retrieving mode uses: the one place that decides it. The modes of
    core.modes.TUNED_RETRIEVAL_MODES search the tuned vector when it is ready, the others "dense"."""
    base = Retriever(store, embedder, settings)
    tuned_one = tuned_retriever(store, embedder, tuned, settings)
    return {mode: (tuned_one if tuned_one is not None and mode in TUNED_RETRIEVAL_MODES else base)
            for mode in sorted(RETRIEVING_MODES)}


def prefer_newer(sources: list[Source]) -> list[Source]:
    """Fresh knowledge wins: a chunk of a document that another retrieved document supersedes
    (its front matter ``supersedes: policies/old.md``) is marked so and moved behind the others;
    the sources are renumbered so that [n] stays the order the model sees."""
    replaced: dict[str, str] = {}
    for source in sources:
        for old in source.supersedes:
            replaced.setdefault(old.strip("/"), source.source)
    if not replaced:
        return sources
    for source in sources:
        for old, newer in replaced.items():
            if source.source != newer and (source.source == old or source.source.endswith("/" + old)):
                source.superseded_by = newer
    ordered = [s for s in sources if s.superseded_by is None] + [s for s in sources if s.superseded_by]
    for n, source in enumerate(ordered, start=1):
        source.n = n
    return ordered
