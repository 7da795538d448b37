"""Closed-label scoring by likelihood, as lm-evaluation-harness scores multiple choice.

For each label the model is asked nothing new: the mode's own chat prompt (``build_messages``
with the chunks the model saw, or None in a mode without retrieval) is rendered with the chat
template up to ``<|im_start|>assistant\\n``, and the log-probability of the assistant answer
starting with "Yes", "No" or "Maybe" is read off one forward pass (only the last position's
logits are computed). Prompt and label are tokenised separately because that is how
generation sees them: the label's tokens follow the prompt's tokens. A label of several tokens
gets its own pass.

Scores are sums of token log-probabilities (the harness's ``acc``, not the length-normalised
``acc_norm``: with SmolLM2's tokenizer each label is one token, so the two agree).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.llm import ChatModel

# What the assistant's answer starts with, per label: capitalised, as an answer would begin.
LABEL_TEXTS: Mapping[str, str] = {"yes": "Yes", "no": "No", "maybe": "Maybe"}


def prompt_ids(chat_model: "ChatModel", messages: Sequence[Mapping[str, str]]) -> list[int]:
    tokenizer = chat_model.tokenizer
    # tokenize=False then encode: transformers 5 returns a BatchEncoding from tokenize=True.
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_logprobs(
    chat_model: "ChatModel",
    messages: Sequence[Mapping[str, str]],
    label_texts: Mapping[str, str] = LABEL_TEXTS,
) -> dict[str, float]:
    """log P(answer starts with label_texts[label] | messages), for each label."""
    import torch

    if chat_model.model is None:
        raise ValueError("likelihood scoring needs the model's weights (llm.mode=local)")
    model = chat_model.model
    context = prompt_ids(chat_model, messages)
    scores: dict[str, float] = {}
    next_token: torch.Tensor | None = None
    with torch.inference_mode():
        for label, text in label_texts.items():
            ids = list(chat_model.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) == 1:
                if next_token is None:  # one forward pass serves every one-token label
                    logits = model(input_ids=torch.tensor([context]), use_cache=False, logits_to_keep=1).logits
                    next_token = torch.log_softmax(logits[0, -1].float(), dim=-1)
                scores[label] = float(next_token[ids[0]])
                continue
            # Several tokens: the prompt plus all but the last label token; the last len(ids)
            # positions predict the label's tokens (only those logits are computed).
            inputs = torch.tensor([context + ids[:-1]])
            logits = model(input_ids=inputs, use_cache=False, logits_to_keep=len(ids)).logits
            steps = torch.log_softmax(logits[0].float(), dim=-1)
            scores[label] = sum(float(steps[i, token]) for i, token in enumerate(ids))
    return scores
