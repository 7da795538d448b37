"""The chat's retriever (evals use it too): Qdrant search and the numbered sources it returns.

``Retriever.retrieve`` applies k, MMR and the score threshold from ``retrieval`` settings and
returns numbered ``Source`` records (the number is the [n] the prompt gives the chunk).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from core.prompts import ContextChunk
from core.settings import Settings

if TYPE_CHECKING:
    from langchain_qdrant import QdrantVectorStore


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



class Retriever:
    """Qdrant search through langchain-qdrant, with k / MMR / score threshold from settings."""

    def __init__(self, store: "QdrantVectorStore", settings: Settings):
        self.store = store
        self.settings = settings.retrieval

    def retrieve(self, query: str) -> list[Source]:
        vector = self.store.embeddings.embed_query(query)
        if self.settings.search == "mmr":
            found = self.store.max_marginal_relevance_search_with_score_by_vector(
                vector, k=self.settings.k, fetch_k=self.settings.fetch_k, lambda_mult=self.settings.mmr_lambda
            )
        else:
            found = self.store.similarity_search_with_score_by_vector(vector, k=self.settings.k)
        threshold = self.settings.score_threshold
        sources = []
        for document, score in found:
            if threshold is not None and score < threshold:
                continue
            chunk = ContextChunk.from_metadata(document.page_content, document.metadata)
            shown = {k: v for k, v in asdict(chunk).items() if k != "n"}
            sources.append(Source(n=len(sources) + 1, score=round(float(score), 4), **shown,
                                  supersedes=list(document.metadata.get("supersedes") or [])))
        return sources


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
