"""python -m finetune embeddings: teach the embedder the team's phrasing ("MI" = "myocardial infarction").

Pairs: each answerable training question with its gold chunk (the same gold chunk ``prepare``
finds: the gold document's chunk nearest the question), plus every abbreviation variant of the
question (expanded and contracted, from the glossary) with the same chunk. Loss:
sentence-transformers' MultipleNegativesRankingLoss, where the other chunks of a batch are the
negatives; the NO_DUPLICATES batch sampler keeps a question's variants, which share a chunk,
out of each other's batches (they would be false negatives).

Measured before and after, on held-out questions and on their abbreviation variants: recall@k,
the share of questions with a chunk of their gold document among the top k of the whole
collection (what retrieval gives the chat model). The collection's stored vectors are not
touched; both models embed the collection's chunks in memory for the measurement.

Output, a full fine-tune: ``<data_dir>/embedders/NAME`` (a sentence-transformers folder +
metrics.json). Using it means re-embedding the collection, which the collection's embedder record
enforces: ``RAGTUNE_EMBEDDING__MODEL=data/embedders/NAME python -m ingest PATH... --reembed``.

Output with ``--lora`` (PEFT on the model's BERT; a few MB): ``<data_dir>/adapters/NAME``
(adapter_config.json, adapter_model.safetensors, embedder.json naming the base, metrics.json).
It does not replace the base embedder: set ``retrieval.tuned_embedder`` to it and ingest writes
its vectors as a second named vector (``retrieval.tuned_vector``) that hybrid mode searches,
while rag keeps the base vector (``python -m ingest tuned-vector`` adds them to an existing index).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.embeddings import TUNED_RECORD, Embedder, packaged_embedder_source
from core.hub import resolve
from core.qa import QARecord, check_disjoint, load_qa
from core.settings import Settings
from core.retrieval import Retriever
from core.store import METADATA_KEY, PUBLIC_SCOPE, SCOPE_KEY
from ingest.chunking import embed_text, payload_embed_text
from finetune.abbreviations import BUILTIN, AbbreviationSwapper, load_glossaries
from finetune.data import Passages, conversation_history, embedded_queries, retrieval_queries, split_records
from finetune.files import InputError, raise_problems, refuse_existing, sha256_file, staged_dir, write_json
from finetune.threads import training_threads

if TYPE_CHECKING:
    from core.store import Store

log = logging.getLogger(__name__)

_SCROLL_PAGE = 1024


class EmbeddingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(16, ge=2, description="pairs per batch; each pair's negatives are the others")
    learning_rate: float = Field(2e-5, gt=0)
    warmup: float = Field(0.1, ge=0, lt=1)
    val_share: float = Field(0.2, gt=0, le=0.5)
    seed: int = 0
    k: list[int] = Field(default_factory=lambda: [1, 3, 5], min_length=1)
    threads: int | Literal["auto"] = "auto"  # see finetune.threads
    # A LoRA (PEFT) instead of a full fine-tune: a few MB beside the base model instead of a
    # 90 MB copy, loaded by retrieval.tuned_embedder and searched as a second named vector.
    lora: bool = False
    lora_rank: int = Field(16, ge=1, le=256)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    # BERT's linear layers: attention (query/key/value, attention.output.dense) and the feed-forward
    # (intermediate.dense, output.dense); "dense" matches all three dense layers.
    lora_targets: list[str] = Field(default_factory=lambda: ["query", "key", "value", "dense"], min_length=1)


@dataclass
class EmbedderResult:
    out: Path
    metrics: dict[str, Any]


def collection_corpus(store: "Store") -> tuple[dict[str, str], dict[str, set[str]]]:
    """Every shared chunk of the collection as embedded text (uploads are not training data), and
    the chunk ids of each document."""
    corpus: dict[str, str] = {}
    by_doc: dict[str, set[str]] = {}
    physical = store.physical_name()
    for point in store.scroll(physical, page=_SCROLL_PAGE) if physical else []:
        meta = point.payload.get(METADATA_KEY, {})
        if meta.get(SCOPE_KEY, PUBLIC_SCOPE) != PUBLIC_SCOPE:
            continue
        corpus[point.id] = payload_embed_text(point.payload)
        by_doc.setdefault(meta["doc_id"], set()).add(point.id)
    return corpus, by_doc


def training_pairs(
    records: list[QARecord], everything: list[QARecord], passages: Passages, swapper: AbbreviationSwapper,
    condense_turns: int,
) -> tuple[list[dict[str, str]], int]:
    """(anchor question, positive chunk text) pairs, abbreviation variants included."""
    answerable = [r for r in records if not r.unanswerable]
    histories = [conversation_history(r, everything) for r in answerable]
    chosen = embedded_queries(answerable, histories, passages, condense_turns)
    pairs: list[dict[str, str]] = []
    variants = 0
    problems: list[str] = []
    for record, (query, vector) in zip(answerable, chosen):
        try:
            doc_id = passages.gold_document(record)
        except InputError as exc:
            problems.append(str(exc))
            continue
        gold = passages.best_in_document(query, vector, doc_id, record.gold_page)
        if gold is None:
            problems.append(f"{record.where}: gold_page {record.gold_page} has no indexed chunk in {doc_id}")
            continue
        positive = embed_text(gold.chunk.title, gold.chunk.section, gold.chunk.text)
        pairs.append({"anchor": query, "positive": positive})
        for variant in swapper.variants(query):
            pairs.append({"anchor": variant, "positive": positive})
            variants += 1
    raise_problems(problems, "gold documents not found")
    return pairs, variants


def held_out_queries(
    records: list[QARecord], everything: list[QARecord], passages: Passages, swapper: AbbreviationSwapper,
    by_doc: dict[str, set[str]], condense_turns: int,
) -> tuple[dict[str, dict[str, str]], dict[str, set[str]]]:
    """Query sets ("questions", "variants") and the relevant chunk ids (all of the gold document).
    Follow-ups are searched as the chat searches them with the base embedder, fixed before training
    so that recall before and after is measured on the same queries."""
    sets: dict[str, dict[str, str]] = {"questions": {}, "variants": {}}
    relevant: dict[str, set[str]] = {}
    answerable = [r for r in records if not r.unanswerable]
    histories = [conversation_history(r, everything) for r in answerable]
    for record, query in zip(answerable, retrieval_queries(answerable, histories, passages, condense_turns)):
        doc_id = passages.gold_document(record)
        sets["questions"][record.id] = query
        relevant[record.id] = by_doc[doc_id]
        for n, variant in enumerate(swapper.variants(query)):
            key = f"{record.id}~{n}"
            sets["variants"][key] = variant
            relevant[key] = by_doc[doc_id]
    return sets, relevant


def recall_at_k(
    model: Any, query_sets: dict[str, dict[str, str]], corpus: dict[str, str], relevant: dict[str, set[str]],
    ks: list[int],
) -> dict[str, dict[str, float]]:
    """Per query set: the share of queries with a relevant chunk among the top k of the corpus.

    The corpus is embedded once per model; sentence-transformers' semantic_search ranks it.
    """
    from sentence_transformers.util import semantic_search

    ids = list(corpus)
    corpus_vectors = model.encode([corpus[i] for i in ids], convert_to_tensor=True, normalize_embeddings=True,
                                  batch_size=32, show_progress_bar=False)
    results: dict[str, dict[str, float]] = {}
    for name, queries in query_sets.items():
        if not queries:
            results[name] = {}
            continue
        keys = list(queries)
        vectors = model.encode([queries[k] for k in keys], convert_to_tensor=True, normalize_embeddings=True,
                               batch_size=32, show_progress_bar=False)
        ranked = semantic_search(vectors, corpus_vectors, top_k=max(ks))
        results[name] = {
            f"recall@{k}": round(sum(
                any(ids[hit["corpus_id"]] in relevant[key] for hit in hits[:k]) for key, hits in zip(keys, ranked)
            ) / len(keys), 4)
            for k in ks
        }
    return results


def train_embedder(
    settings: Settings,
    qa_path: Path,
    name: str,
    options: EmbeddingOptions,
    *,
    val_qa_path: Path | None = None,
    glossaries: list[Path] | None = None,
    store: "Store | None" = None,
    embedder: Embedder | None = None,
    force: bool = False,
    progress: bool = False,
) -> EmbedderResult:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    started = time.perf_counter()
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"--out {name!r}: give a plain name; the embedder is saved to <data_dir>/embedders/NAME "
                         "(--lora: <data_dir>/adapters/NAME)")
    target = (settings.adapters_dir if options.lora else settings.data_dir / "embedders") / name
    refuse_existing(target, force)

    records = load_qa(qa_path)
    if val_qa_path is not None:
        held_out = load_qa(val_qa_path)
        check_disjoint(records, held_out)
        train_records = records
    else:
        train_records, held_out = split_records(records, options.val_share, options.seed)
    everything = train_records + held_out
    table = load_glossaries(glossaries) if glossaries else {}
    swapper = AbbreviationSwapper(table or BUILTIN)

    if embedder is None:
        from core.embeddings import load_embedder

        embedder = load_embedder(settings.embedding)
    owns_store = store is None
    if store is None:
        from core.store import open_store

        store = open_store(settings)
    try:
        passages = Passages(Retriever(store, embedder, settings))
        turns = settings.chat.condense_turns
        pairs, variant_pairs = training_pairs(train_records, everything, passages, swapper, turns)
        corpus, by_doc = collection_corpus(store)
        query_sets, relevant = held_out_queries(held_out, everything, passages, swapper, by_doc, turns)
    finally:
        if owns_store:
            store.close()
    if len(pairs) < 2:
        raise InputError(f"{qa_path}: {len(pairs)} (question, gold chunk) pair(s); at least 2 are needed")

    import torch

    torch.set_num_threads(training_threads(options.threads))
    source = resolve(settings.embedding.model, packaged_embedder_source)
    model = SentenceTransformer(source.location, device=settings.embedding.device,
                                local_files_only=source.local)
    ks = sorted(set(options.k))
    before = recall_at_k(model, query_sets, corpus, relevant, ks)
    if options.lora:
        from peft import LoraConfig, get_peft_model

        module = model[0]  # the Transformer module; its .model (auto_model) is the BERT that gets the LoRA
        module.model = get_peft_model(module.model, LoraConfig(
            r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
            target_modules=options.lora_targets, bias="none",
        ))
        trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
        log.info("LoRA rank %d on %s: %d trainable parameters", options.lora_rank, options.lora_targets, trainable)

    checkpoints = settings.data_dir / "checkpoints" / f"embedder-{name}"
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        warmup_steps=options.warmup,  # a float below 1 is a share of the steps
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        seed=options.seed, data_seed=options.seed,
        use_cpu=True, bf16=False, fp16=False,
        save_strategy="no", report_to="none", logging_steps=10, disable_tqdm=not progress,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(pairs), loss=MultipleNegativesRankingLoss(model),
    )
    train_started = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - train_started
    shutil.rmtree(checkpoints, ignore_errors=True)

    after = recall_at_k(model, query_sets, corpus, relevant, ks)
    metrics: dict[str, Any] = {
        "name": name,
        "base_embedder": embedder.info.name,
        "collection": settings.qdrant.collection,
        "corpus_chunks": len(corpus),
        "train_questions": sum(not r.unanswerable for r in train_records),
        "train_pairs": len(pairs),
        "abbreviation_variant_pairs": variant_pairs,
        "abbreviations": len(swapper.table),
        "glossaries": [str(p) for p in glossaries or []] or ["built-in table"],
        "held_out": {s: len(q) for s, q in query_sets.items()},
        "recall_before": before,
        "recall_after": after,
        "train_loss": round(float(output.training_loss), 4),
        "train_wall_s": round(train_seconds, 1),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "options": options.model_dump(),
        "kind": "lora" if options.lora else "full",
        "threads": torch.get_num_threads(),
        "inputs": {"qa": {"path": str(qa_path), "sha256": sha256_file(Path(qa_path))},
                   **({"val_qa": {"path": str(val_qa_path), "sha256": sha256_file(Path(val_qa_path))}}
                      if val_qa_path else {})},
    }
    with staged_dir(target, force) as staging:
        if options.lora:
            adapter = model[0].model  # the PeftModel: its save_pretrained writes the LoRA alone
            # The base is named as the collection records it, not by this machine's package path:
            # core.embeddings.load_tuned_embedder puts the LoRA on the configured embedding.model.
            adapter.peft_config["default"].base_model_name_or_path = embedder.info.name
            adapter.save_pretrained(str(staging))  # adapter_config.json + adapter_model.safetensors only
            (staging / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
            write_json(staging / TUNED_RECORD, {"base_embedder": embedder.info.name, "lora_rank": options.lora_rank,
                                                "lora_targets": options.lora_targets})
        else:
            model.save_pretrained(str(staging))
        write_json(staging / "metrics.json", metrics)
    return EmbedderResult(out=target, metrics=metrics)


def format_report(metrics: dict[str, Any]) -> str:
    lines = [f"{metrics['train_pairs']} training pairs ({metrics['abbreviation_variant_pairs']} abbreviation variants), "
             f"{metrics['train_wall_s']} s; recall@k over {metrics['corpus_chunks']} chunks:"]
    for query_set, count in metrics["held_out"].items():
        if not count:
            continue
        before, after = metrics["recall_before"][query_set], metrics["recall_after"][query_set]
        cells = ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in before)
        lines.append(f"  held-out {query_set} ({count}): {cells}")
    return "\n".join(lines)
