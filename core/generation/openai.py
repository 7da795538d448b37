"""llm.backend=openai: an OpenAI-compatible server (vLLM, TGI, llama.cpp's server, Ollama) via ChatOpenAI.

The weights stay on the server; ``llm.openai.model`` answers for the base, ``adapter_model``
(the served LoRA's name) for hybrid and finetuned. Token counts for the context budget come
from the tokenizer of ``llm.model`` loaded locally (packaged: SmolLM2's): exact when the server
serves that model, an estimate otherwise, since the OpenAI API has no tokenize call. The chat
completions API gives no prompt log-probabilities, so closed-label likelihoods are unavailable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from core.generation.base import LABEL_TEXTS, GenerationBackend, LikelihoodUnavailable, Messages, backend_unavailable
from core.llm import load_chat_model
from core.settings import Settings

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel


class OpenAIBackend(GenerationBackend):
    name = "openai"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        try:
            import langchain_openai  # noqa: F401
        except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
            raise backend_unavailable(self.name, "langchain-openai", exc) from exc
        self._tokenizer: Any = None

    @property
    def has_adapter(self) -> bool:
        return bool(self.settings.llm.openai.adapter_model)

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = load_chat_model(self.settings, tokenizer_only=True).tokenizer
            return self._tokenizer

    def _build_chat_model(self, adapted: bool, max_new_tokens: int) -> "BaseChatModel":
        from langchain_openai import ChatOpenAI

        llm, served = self.settings.llm, self.settings.llm.openai
        return ChatOpenAI(
            base_url=served.base_url, api_key=served.api_key, timeout=served.timeout_s, streaming=True,
            model=served.adapter_model if adapted else served.model,
            max_tokens=max_new_tokens, temperature=llm.temperature,
            # repetition_penalty is not part of the OpenAI API; vLLM and llama.cpp accept it as an extra.
            extra_body={"repetition_penalty": llm.repetition_penalty},
        )

    def count_prompt_tokens(self, messages: Messages) -> int:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label_logprobs(
        self, messages: Messages, adapted: bool, label_texts: Mapping[str, str] = LABEL_TEXTS
    ) -> dict[str, float]:
        raise LikelihoodUnavailable("a served model (llm.backend=openai) gives no prompt log-probabilities")

    def warm_up(self, adapted: bool) -> None:
        self.tokenizer  # noqa: B018 - the server holds the weights; the tokenizer is what loads here
        super().warm_up(adapted)

    def describe(self) -> dict[str, Any]:
        served = self.settings.llm.openai
        return {
            "backend": self.name, "weights": f"{served.model} at {served.base_url}",
            "adapter": f"served as {served.adapter_model}" if served.adapter_model else None,
            "tokenizer": self.settings.llm.model,
        }
