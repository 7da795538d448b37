"""The generation backend interface: what the chain, the evals and fine-tuning ask of a chat model.

A backend serves the base weights and, when ``llm.adapter`` is set, the adapted ones. Callers see
only this interface; ``core.generation.build_backend`` picks the implementation by
``llm.backend``. Chat models are LangChain ``BaseChatModel``s (the chain calls ``.stream``),
cached per (adapted, max_new_tokens) so a caller may ask for one per answer.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from core.settings import Settings

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

Messages = Sequence[Mapping[str, str]]

# What the assistant's answer starts with, per closed label: capitalised, as an answer would begin.
LABEL_TEXTS: Mapping[str, str] = {"yes": "Yes", "no": "No", "maybe": "Maybe"}


class LikelihoodUnavailable(RuntimeError):
    """This backend cannot read the model's token probabilities (a served model over the OpenAI API)."""


class NoAdapterError(RuntimeError):
    """Adapted weights were asked for, but no adapter is configured (llm.adapter)."""


class GenerationBackend(ABC):
    """One backend's base and adapted chat models, their tokenizer, and their likelihoods."""

    name: str  # the llm.backend value

    def __init__(self, settings: Settings):
        self.settings = settings
        self._chat_models: dict[tuple[bool, int], BaseChatModel] = {}
        self._lock = threading.RLock()

    # -- what every backend implements -------------------------------------------------------
    @property
    @abstractmethod
    def has_adapter(self) -> bool:
        """Whether the adapted weights can answer (hybrid and finetuned modes)."""

    @abstractmethod
    def _build_chat_model(self, adapted: bool, max_new_tokens: int) -> "BaseChatModel":
        """A chat model for these weights and this answer length (called once per pair)."""

    @abstractmethod
    def count_prompt_tokens(self, messages: Messages) -> int:
        """Tokens of ``messages`` rendered with the chat template, generation prompt included."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of a plain text, without special tokens (an answer, a history turn)."""

    @abstractmethod
    def label_logprobs(
        self, messages: Messages, adapted: bool, label_texts: Mapping[str, str] = LABEL_TEXTS
    ) -> dict[str, float]:
        """log P(the answer starts with label_texts[label] | messages), per label.

        Prompt and label are tokenised apart, as generation sees them (the label's tokens follow
        the prompt's); scores are sums of token log-probabilities (lm-evaluation-harness ``acc``).
        Raises ``LikelihoodUnavailable`` where the backend has no access to probabilities.
        """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What generates (evals' run.json, bench output): at least ``backend``, ``weights`` (the
        model file, id or served name) and ``adapter`` (its folder, a served name, or None)."""

    def stream_continuation(
        self, messages: Messages, prefix: str, adapted: bool, max_new_tokens: int | None = None
    ) -> Iterator[str]:
        """Text pieces that continue an assistant answer already begun with ``prefix`` (the chain
        writes the verified quotes itself and the model goes on from them; core/quotes.py).

        The default, for backends that cannot condition on a begun answer (the OpenAI chat API
        has no portable "continue the last assistant message"), streams an answer to
        ``messages`` alone; the caller still shows ``prefix`` before it."""
        model = self.chat_model(adapted, max_new_tokens)
        for chunk in model.stream(to_langchain(messages)):
            if chunk.content:
                yield str(chunk.content)

    def warm_up(self, adapted: bool) -> None:
        """Load what answering with these weights needs, so the first answer does not wait for it."""
        self.chat_model(adapted)

    def close(self) -> None:
        """Free the weights (a backend may be used again afterwards: it loads them anew)."""
        with self._lock:
            self._chat_models.clear()

    # -- shared ------------------------------------------------------------------------------
    def chat_model(self, adapted: bool, max_new_tokens: int | None = None) -> "BaseChatModel":
        """The chat model for base or adapted weights; ``max_new_tokens`` defaults to llm.max_new_tokens."""
        if adapted and not self.has_adapter:
            raise NoAdapterError("no adapter configured (llm.adapter)")
        key = (adapted, max_new_tokens or self.settings.llm.max_new_tokens)
        with self._lock:
            if key not in self._chat_models:
                self._chat_models[key] = self._build_chat_model(*key)
            return self._chat_models[key]


def to_langchain(messages: Messages) -> list[Any]:
    """Role/content dicts (core.prompts.build_messages) as LangChain messages."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    return [kinds[m["role"]](content=m["content"]) for m in messages]


def backend_unavailable(backend: str, package: str, exc: ImportError) -> ImportError:
    """An import error that names the setting and what to install."""
    return ImportError(f"llm.backend={backend} needs {package}: pip install {package} ({exc})")
