"""Counting tokens the way the chat model sees them: through its own chat template."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def chat_token_count(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]]) -> int:
    """Tokens of a whole conversation, rendered by the model's chat template."""
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def length_stats(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)
    return {
        "count": len(ordered),
        "total": sum(ordered),
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "median": statistics.median_low(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }
