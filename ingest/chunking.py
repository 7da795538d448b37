"""Token-aware chunking with the embedder's own tokenizer.

all-MiniLM-L6-v2 reads 256 word pieces and silently truncates the rest, so a chunk that is
too long loses its tail from the index without a word. Chunks are cut by LangChain's
RecursiveCharacterTextSplitter measuring length in the embedder's tokens (paragraph, line,
sentence, word boundaries first), and every chunk's *embedded* text (title and section line
included) is checked against the model limit and cut at token offsets if it is still over.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from langchain_text_splitters import RecursiveCharacterTextSplitter

from core.embeddings import Embedder
from core.store import CONTENT_KEY, METADATA_KEY
from ingest.loaders import SourceDocument


def embed_text(title: str, section: str | None, text: str) -> str:
    """What is embedded for a chunk: its heading line (title, and section when it differs), then the text."""
    heading = f"{title} | {section}" if section and section != title else title
    return f"{heading}\n{text}"


def payload_embed_text(payload: dict[str, Any]) -> str:
    """A stored chunk's embedded text, rebuilt from its payload (which keeps the text without the
    heading): what a second vector (python -m ingest tuned-vector), a migration or the embedder
    fine-tune embeds must be what the index embedded."""
    meta = payload.get(METADATA_KEY) or {}
    return embed_text(meta.get("title", ""), meta.get("section"), str(payload.get(CONTENT_KEY, "")))


@dataclass(frozen=True)
class Chunk:
    text: str  # what the chat model reads and cites
    embed_text: str  # what is embedded: the text under its title and section
    index: int
    metadata: dict

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


class Chunker:
    def __init__(self, embedder: Embedder, chunk_tokens: int, chunk_overlap: int):
        self.embedder = embedder
        self.limit = embedder.max_content_tokens
        size = min(chunk_tokens, self.limit)
        self.splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            embedder.tokenizer,
            chunk_size=size,
            chunk_overlap=min(chunk_overlap, size // 2),
            separators=["\n\n", "\n", ". ", "; ", ", ", " ", ""],
            keep_separator="end",
        )
        self.id = f"{embedder.info.name}|{size}|{chunk_overlap}|v1"

    def split(self, document: SourceDocument) -> list[Chunk]:
        chunks: list[Chunk] = []
        for part in document.parts:
            heading = embed_text(document.title, part.metadata.get("section"), "").rstrip("\n")
            for piece in self.splitter.split_text(part.page_content):
                piece = piece.strip()
                if not piece:
                    continue
                for text in self._fit(heading, piece):
                    metadata = {k: v for k, v in part.metadata.items() if v not in (None, "")}
                    chunks.append(Chunk(text=text, embed_text=f"{heading}\n{text}", index=len(chunks), metadata=metadata))
        return chunks

    def _fit(self, heading: str, text: str) -> list[str]:
        """Cut ``text`` so that heading + text stays within the embedder's limit."""
        budget = self.limit - self.embedder.count_tokens(heading + "\n")
        if self.embedder.count_tokens(text) <= budget:
            return [text]
        budget = max(budget, 16)
        encoded = self.embedder.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        pieces = []
        for start in range(0, len(offsets), budget):
            window = offsets[start:start + budget]
            pieces.append(text[window[0][0]:window[-1][1]].strip())
        return [p for p in pieces if p]
