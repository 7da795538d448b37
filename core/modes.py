"""The four answer modes: the one definition the chain, the CLIs, the settings, the evals and the app share.

| mode      | model                | retrieval                                          |
|-----------|----------------------|----------------------------------------------------|
| hybrid    | base + LoRA adapter  | yes: the tuned embedder's vector (when there is one) |
| rag       | base                 | yes: the base embedder's vector                    |
| finetuned | base + LoRA adapter  | no                                                 |
| base      | base                 | no                                                 |
"""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["hybrid", "rag", "finetuned", "base"]
MODES: tuple[Mode, ...] = get_args(Mode)
RETRIEVING_MODES: frozenset[Mode] = frozenset({"hybrid", "rag"})
ADAPTED_MODES: frozenset[Mode] = frozenset({"hybrid", "finetuned"})
# The modes whose retrieval searches retrieval.tuned_vector (the fine-tuned embedder's vectors),
# when retrieval.tuned_embedder is set and every chunk has that vector; the others search "dense".
TUNED_RETRIEVAL_MODES: frozenset[Mode] = frozenset({"hybrid"})

NO_ADAPTER = (
    "No fine-tuned adapter is configured, so the '{mode}' mode cannot answer. Set llm.adapter "
    "(for example llm.adapter=demo) or choose the 'rag' or 'base' mode."
)
