"""python -m finetune prepare --from-feedback: the chat's thumbs up and down -> training data.

The chat stores every answer with the chunks its prompt held (its sources) and the user's thumbs
up or down (``chatbot.memory``). This turns them into three kinds of example, in the formats TRL
reads, every prompt rebuilt by ``core.prompts.build_messages`` as the chat chain built it (the
mode's system prompt, the numbered chunks of a retrieving mode, the earlier turns as history):

- ``sft/``: liked answers, ``{"prompt", "completion"}``, the format ``prepare`` writes (an answer
  from ``rag`` or ``hybrid`` keeps its chunks, so it is a RAFT-style example);
- ``kto/``: every rated answer, ``{"prompt", "completion", "label"}`` (liked true, disliked
  false), for KTO, which learns from unpaired thumbs (Ethayarajh et al. 2024, "KTO: Model
  Alignment as Prospect Theoretic Optimization");
- ``dpo/``: ``{"prompt", "chosen", "rejected"}`` wherever the same question (after the same
  earlier questions, and with documents or without alike) got a liked and a disliked answer; the
  prompt is the liked answer's.

Whose answers: ``feedback.train_on`` (``opted_in``: only ``feedback.opted_in_owners``; ``all``;
``none``), and never ``feedback.excluded_owners`` or ``--exclude-user``. The opt-in is a setting
rather than a flag stored per user because the page that would let a user set it is being
rewritten (issue 14); the list is the administrator's record of who agreed, reviewable where the
settings are, and a stored flag can feed the same filter later.

Left out, and counted by reason in ``summary.json``: answers of owners who did not opt in or are
excluded; answers the model did not write (the chain's own "no adapter" notice, or its
NOT_COVERED when retrieval found nothing: training on those would teach a prompt the model never
sees); empty answers; answers whose prompt is over ``--max-tokens`` even without history (history
is trimmed oldest turn first, as the chat trims it); exact repeats of an example (kept once) and
answers liked by one user and disliked by another for the same prompt (dropped: they teach nothing).

Split: train / validation by conversation, seeded (``--seed``, ``--val-share``); conversations that
share a question stay on one side, so a DPO pair and its KTO halves never straddle the split. The
same database and settings give the same bytes. Output (staged, renamed into place when complete):

    OUT/sft/{train,validation}.jsonl  OUT/kto/{train,validation}.jsonl  OUT/dpo/{train,validation}.jsonl
    OUT/summary.json   what was used and left out, examples per owner and per conversation, token lengths
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from core.modes import ADAPTED_MODES, MODES, NO_ADAPTER, RETRIEVING_MODES
from chatbot.memory import ChatMemory, RatedAnswer
from core.prompts import NOT_COVERED, ContextChunk, build_messages
from core.settings import FeedbackSettings, Settings
from finetune.files import InputError, refuse_existing, sha256_file, staged_dir, write_json, write_jsonl
from finetune.tokens import chat_token_count, length_stats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KINDS = ("sft", "kto", "dpo")
SPLITS = ("train", "validation")


class FeedbackOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    val_share: float = Field(0.1, gt=0.0, le=0.5, description="share of the rated answers held out for validation")
    seed: int = 0
    exclude_owners: list[str] = Field(default_factory=list, description="--exclude-user: beside feedback.excluded_owners")
    max_tokens: int | None = Field(None, ge=32, description="longest example allowed; default llm.context_window")


@dataclass
class RatedExample:
    """A rated answer that may be trained on, with the prompt the chain gave the model."""

    answer: RatedAnswer
    prompt: list[dict[str, str]]
    key: str  # the same key = the same question, for DPO pairs

    @property
    def liked(self) -> bool:
        return self.answer.feedback > 0

    @property
    def completion(self) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": self.answer.answer}]


# -- who and what ------------------------------------------------------------------------------
def owner_ids(names: list[str]) -> set[str]:
    """Owners as the chat stores them: a bare name is the signed-in user ``user:NAME``."""
    return {name if ":" in name else f"user:{name}" for name in names}


def owner_reason(owner: str, policy: FeedbackSettings, excluded: set[str]) -> str | None:
    """Why this owner's answers may not be trained on, or None when they may."""
    if owner in excluded:
        return "excluded"
    if policy.train_on == "opted_in" and owner not in owner_ids(policy.opted_in_owners):
        return "not_opted_in"
    return None


def answer_reason(answer: RatedAnswer) -> str | None:
    """Why an answer is not the model's to learn from, or None when it is."""
    if answer.mode not in MODES:
        return "unknown_mode"
    if not answer.answer.strip():
        return "empty"
    if answer.mode in ADAPTED_MODES and answer.answer == NO_ADAPTER.format(mode=answer.mode):
        return "not_generated"
    if answer.mode in RETRIEVING_MODES and not answer.sources and answer.answer == NOT_COVERED:
        return "not_generated"  # the chain's own reply when no chunk passed the threshold
    return None


def _normalized(text: str) -> str:
    return " ".join(text.casefold().split())


def question_key(answer: RatedAnswer) -> str:
    with_documents = answer.mode in RETRIEVING_MODES
    return json.dumps([with_documents, [_normalized(q) for q, _ in answer.history], _normalized(answer.question)])


def rebuild_prompt(
    answer: RatedAnswer, tokenizer: "PreTrainedTokenizerBase", limit: int
) -> list[dict[str, str]] | None:
    """The chain's prompt for this answer, earlier turns dropped oldest first until the example
    fits in ``limit`` tokens; None when it does not fit even without them."""
    chunks = None
    if answer.mode in RETRIEVING_MODES:
        chunks = [ContextChunk(str(s.get("text", "")), str(s.get("title", "")), str(s.get("source", "")),
                               s.get("page"), s.get("section")) for s in answer.sources]
    completion = [{"role": "assistant", "content": answer.answer}]
    history = list(answer.history)
    while True:
        prompt = build_messages(answer.question, chunks, history)
        if chat_token_count(tokenizer, prompt + completion) <= limit:
            return prompt
        if not history:
            return None
        history = history[1:]


def dedupe(examples: list[RatedExample]) -> tuple[list[RatedExample], Counter[str]]:
    """One example per (prompt, answer); a prompt and answer both liked and disliked is dropped."""
    groups: dict[str, list[RatedExample]] = defaultdict(list)
    for example in examples:
        groups[json.dumps([example.prompt, example.answer.answer])].append(example)
    kept: list[RatedExample] = []
    dropped: Counter[str] = Counter()
    for group in groups.values():
        if len({e.liked for e in group}) > 1:
            dropped["conflicting"] += len(group)
            continue
        kept.append(group[0])
        dropped["duplicate"] += len(group) - 1
    return sorted(kept, key=lambda e: e.answer.message_id), dropped


def split_examples(
    examples: list[RatedExample], val_share: float, seed: int
) -> tuple[list[RatedExample], list[RatedExample]]:
    """Seeded split by conversation; conversations that share a question key go together."""
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            node = parent[node]
        return node

    first_with_key: dict[str, str] = {}
    for example in examples:
        conversation = example.answer.conversation_id
        other = first_with_key.setdefault(example.key, conversation)
        parent[root(conversation)] = root(other)
    groups: dict[str, list[RatedExample]] = defaultdict(list)
    for example in examples:
        groups[root(example.answer.conversation_id)].append(example)
    if len(groups) < 2:
        raise InputError(
            f"the {len(examples)} usable rated answer(s) come from one conversation (or conversations that share "
            "a question): a training and a validation split need at least two"
        )
    order = sorted(groups, key=lambda g: groups[g][0].answer.message_id)
    random.Random(f"{seed}:feedback-split").shuffle(order)
    # Whole groups, never more than the share asks for (a chat's groups are few and uneven, so
    # "until the share is reached" could hold out half of it); at least the smallest one.
    wanted = max(1, round(val_share * len(examples)))
    chosen: set[str] = set()
    taken = 0
    for group in order:
        if taken + len(groups[group]) <= wanted:
            chosen.add(group)
            taken += len(groups[group])
    if not chosen:
        chosen.add(min(order, key=lambda g: len(groups[g])))
    train = [e for g in groups if g not in chosen for e in groups[g]]
    validation = [e for g in chosen for e in groups[g]]
    by_id = lambda e: e.answer.message_id  # noqa: E731
    return sorted(train, key=by_id), sorted(validation, key=by_id)


# -- rows ---------------------------------------------------------------------------------------
def _bookkeeping(example: RatedExample) -> dict[str, Any]:
    answer = example.answer
    return {"id": f"fb-{answer.message_id}", "conversation_id": answer.conversation_id,
            "message_id": answer.message_id, "mode": answer.mode,
            "sources": [str(s.get("source", "")) for s in answer.sources]}


def sft_rows(examples: list[RatedExample]) -> list[dict[str, Any]]:
    return [_bookkeeping(e) | {"case": "liked", "prompt": e.prompt, "completion": e.completion}
            for e in examples if e.liked]


def kto_rows(examples: list[RatedExample], seed: int, split: str) -> list[dict[str, Any]]:
    """Shuffled (seeded): KTO reads its data in order and estimates its KL term from each batch's
    neighbours, so likes and dislikes must be mixed, not grouped by conversation."""
    rows = [_bookkeeping(e) | {"case": "liked" if e.liked else "disliked", "prompt": e.prompt,
                               "completion": e.completion, "label": e.liked} for e in examples]
    random.Random(f"{seed}:kto:{split}").shuffle(rows)
    return rows


def dpo_rows(examples: list[RatedExample]) -> list[dict[str, Any]]:
    by_key: dict[str, list[RatedExample]] = defaultdict(list)
    for example in examples:
        by_key[example.key].append(example)
    rows = []
    for group in by_key.values():
        liked = [e for e in group if e.liked]
        disliked = [e for e in group if not e.liked]
        for chosen in liked:
            for rejected in disliked:
                if chosen.answer.answer == rejected.answer.answer:
                    continue
                rows.append({
                    "id": f"fb-{chosen.answer.message_id}-{rejected.answer.message_id}", "case": "pair",
                    "chosen_message_id": chosen.answer.message_id, "rejected_message_id": rejected.answer.message_id,
                    "conversation_ids": sorted({chosen.answer.conversation_id, rejected.answer.conversation_id}),
                    "prompt": chosen.prompt, "chosen": chosen.completion, "rejected": rejected.completion,
                })
    return sorted(rows, key=lambda r: (r["chosen_message_id"], r["rejected_message_id"]))


# -- the command --------------------------------------------------------------------------------
@dataclass
class FeedbackResult:
    out: Path
    summary: dict[str, Any]


def prepare_feedback(
    settings: Settings,
    out: Path,
    options: FeedbackOptions,
    *,
    memory: ChatMemory | None = None,
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    force: bool = False,
) -> FeedbackResult:
    """Read the rated answers, keep what may be trained on, split, write all three kinds at once."""
    refuse_existing(out, force)
    policy = settings.feedback
    if policy.train_on == "none":
        raise InputError("feedback.train_on is 'none': no feedback may become training data "
                         "(set it to opted_in with feedback.opted_in_owners, or to all)")
    if memory is None:
        if not settings.history_db.is_file():
            raise InputError(f"{settings.history_db}: no chat history (chat.history_db) to read feedback from")
        memory = ChatMemory(settings.history_db)
    if tokenizer is None:
        from core.llm import load_chat_model

        tokenizer = load_chat_model(settings, tokenizer_only=True).tokenizer
    limit = options.max_tokens or settings.llm.context_window
    excluded = owner_ids(policy.excluded_owners) | owner_ids(options.exclude_owners)

    answers = memory.rated_answers()
    skipped: Counter[str] = Counter()
    skipped_owners: dict[str, set[str]] = defaultdict(set)
    candidates: list[RatedExample] = []
    for answer in answers:
        reason = owner_reason(answer.owner, policy, excluded)
        if reason is not None:
            skipped[reason] += 1
            skipped_owners[reason].add(answer.owner)
            continue
        reason = answer_reason(answer)
        prompt = rebuild_prompt(answer, tokenizer, limit) if reason is None else None
        if reason is None and prompt is None:
            reason = "too_long"
        if reason is not None:
            skipped[reason] += 1
            continue
        candidates.append(RatedExample(answer, prompt, question_key(answer)))  # type: ignore[arg-type]
    if not candidates:
        raise InputError(
            f"{settings.history_db}: none of the {len(answers)} rated answers may be trained on "
            f"({', '.join(f'{r} {n}' for r, n in sorted(skipped.items())) or 'no answer has a thumbs up or down'}; "
            f"feedback.train_on is {policy.train_on!r})"
        )
    examples, dropped = dedupe(candidates)
    splits = dict(zip(SPLITS, split_examples(examples, options.val_share, options.seed)))
    rows = {
        "sft": {name: sft_rows(part) for name, part in splits.items()},
        "kto": {name: kto_rows(part, options.seed, name) for name, part in splits.items()},
        "dpo": {name: dpo_rows(part) for name, part in splits.items()},
    }
    summary = summarise(answers, examples, splits, rows, tokenizer)
    summary["skipped"] = dict(sorted(skipped.items()))
    summary["skipped_owners"] = {reason: len(owners) for reason, owners in sorted(skipped_owners.items())}
    summary["dropped"] = dict(sorted((k, v) for k, v in dropped.items() if v))
    summary["policy"] = {"train_on": policy.train_on, "opted_in_owners": len(policy.opted_in_owners),
                         "excluded_owners": len(excluded)}
    summary["options"] = options.model_dump(exclude={"exclude_owners"}) | {"max_tokens": limit}
    summary["inputs"] = {"history_db": str(memory.path), "sha256": sha256_file(memory.path)}
    summary["chat_model"] = settings.llm.model

    with staged_dir(out, force) as staging:
        for kind, by_split in rows.items():
            (staging / kind).mkdir()
            for name, part in by_split.items():
                write_jsonl(staging / kind / f"{name}.jsonl", part)
        write_json(staging / "summary.json", summary)
    return FeedbackResult(out=out, summary=summary)


def summarise(
    answers: list[RatedAnswer],
    examples: list[RatedExample],
    splits: dict[str, list[RatedExample]],
    rows: dict[str, dict[str, list[dict[str, Any]]]],
    tokenizer: "PreTrainedTokenizerBase",
) -> dict[str, Any]:
    owner_of = {e.answer.message_id: e.answer.owner for e in examples}
    by_owner: dict[str, Counter[str]] = defaultdict(Counter)
    by_conversation: dict[str, Counter[str]] = defaultdict(Counter)
    for example in examples:
        by_owner[example.answer.owner]["liked" if example.liked else "disliked"] += 1
    for kind, by_split in rows.items():
        for part in by_split.values():
            for row in part:
                message_ids = [row["chosen_message_id"], row["rejected_message_id"]] if kind == "dpo" else [row["message_id"]]
                conversations = row.get("conversation_ids") or [row["conversation_id"]]
                for owner in sorted({owner_of[m] for m in message_ids}):
                    by_owner[owner][kind] += 1
                for conversation in conversations:
                    by_conversation[conversation][kind] += 1
    conversation_owner = {e.answer.conversation_id: e.answer.owner for e in examples}
    summary: dict[str, Any] = {
        "rated_answers": {"all": len(answers), "liked": sum(a.feedback > 0 for a in answers),
                          "disliked": sum(a.feedback < 0 for a in answers), "used": len(examples)},
        "records": {name: len(part) for name, part in splits.items()},
        "by_owner": {owner: {k: counts[k] for k in ("liked", "disliked", *KINDS)} for owner, counts in sorted(by_owner.items())},
        "by_conversation": {c: {"owner": conversation_owner[c], **{k: counts[k] for k in KINDS}}
                            for c, counts in sorted(by_conversation.items())},
    }
    for kind, by_split in rows.items():
        summary[kind] = {}
        for name, part in by_split.items():
            ends = ("chosen", "rejected") if kind == "dpo" else ("completion",)
            lengths = [max(chat_token_count(tokenizer, row["prompt"] + row[end]) for end in ends) for row in part]
            entry: dict[str, Any] = {"examples": len(part), "tokens": length_stats(lengths)}
            if kind == "kto":
                entry["liked"] = sum(row["label"] for row in part)
                entry["disliked"] = len(part) - entry["liked"]
            summary[kind][name] = entry
    return summary


def format_feedback_summary(summary: dict[str, Any]) -> str:
    """The few lines a person reads after prepare --from-feedback."""
    rated = summary["rated_answers"]
    skipped = ", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items()) or "none"
    dropped = ", ".join(f"{reason} {n}" for reason, n in summary["dropped"].items()) or "none"
    lines = [
        f"rated answers: {rated['all']} ({rated['liked']} liked, {rated['disliked']} disliked); used {rated['used']}; "
        f"left out: {skipped}; dropped: {dropped}",
        f"records: train {summary['records']['train']}, validation {summary['records']['validation']}",
    ]
    for kind in KINDS:
        for name in SPLITS:
            entry = summary[kind][name]
            tokens = entry["tokens"]
            extra = f" ({entry['liked']} liked, {entry['disliked']} disliked)" if kind == "kto" else ""
            lines.append(f"{kind:4} {name:10} {entry['examples']:5} examples{extra}; tokens "
                         f"mean {tokens.get('mean', 0)}, max {tokens.get('max', 0)}")
    lines.append("by owner: " + "; ".join(
        f"{owner}: sft {c['sft']}, kto {c['kto']}, dpo {c['dpo']}" for owner, c in summary["by_owner"].items()))
    return "\n".join(lines)
