"""llm.backend=transformers: torch fp32 in-process, ChatHuggingFace over a pipeline, PEFT for the adapter.

Any Hugging Face id or folder (``llm.model``), and the weights training sees: the served =
trained check of a GGUF export compares against this path. Two model copies rather than one
PeftModel with ``disable_adapter()``: that context manager changes shared state, which concurrent
answers in different modes would race on; the 135M model costs ~0.5 GB per copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from core.generation.base import LABEL_TEXTS, GenerationBackend, Messages, backend_unavailable
from core.llm import ChatModel, load_chat_model, resolve_adapter
from core.settings import Settings

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel


class TransformersBackend(GenerationBackend):
    name = "transformers"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        try:
            import transformers  # noqa: F401
        except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
            raise backend_unavailable(self.name, "transformers", exc) from exc
        self._adapter = resolve_adapter(settings)  # fails at start-up, not at the first hybrid question
        self._loaders: dict[bool, Callable[[], ChatModel]] = {
            False: lambda: load_chat_model(settings, with_adapter=False),
        }
        if self._adapter is not None:
            self._loaders[True] = lambda: load_chat_model(settings, with_adapter=True)
        self._loaded: dict[bool, ChatModel] = {}

    @property
    def has_adapter(self) -> bool:
        return self._adapter is not None

    def weights(self, adapted: bool) -> ChatModel:
        """The loaded model and tokenizer (loaded on first use)."""
        with self._lock:
            if adapted not in self._loaded:
                self._loaded[adapted] = self._loaders[adapted]()
            return self._loaded[adapted]

    @property
    def tokenizer(self) -> Any:
        return self.weights(False).tokenizer

    def _build_chat_model(self, adapted: bool, max_new_tokens: int) -> "BaseChatModel":
        from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
        from transformers import pipeline

        chat = self.weights(adapted)
        llm = self.settings.llm
        generation: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "repetition_penalty": llm.repetition_penalty,
            "return_full_text": False,
            # EOS is <|im_end|> for SmolLM2: generation stops there or at max_new_tokens.
            "eos_token_id": chat.tokenizer.eos_token_id,
            "pad_token_id": chat.tokenizer.pad_token_id or chat.tokenizer.eos_token_id,
        }
        if llm.temperature > 0:
            generation |= {"do_sample": True, "temperature": llm.temperature}
        else:
            generation |= {"do_sample": False}
        pipe = pipeline("text-generation", model=chat.model, tokenizer=chat.tokenizer, **generation)
        return ChatHuggingFace(llm=HuggingFacePipeline(pipeline=pipe), tokenizer=chat.tokenizer)

    def stream_continuation(
        self, messages: Messages, prefix: str, adapted: bool, max_new_tokens: int | None = None
    ) -> Iterator[str]:
        # The chat model's pipeline, on the rendered prompt with the begun answer after it
        # (ChatHuggingFace itself insists that the last message is the user's).
        chat_model = self.chat_model(adapted, max_new_tokens)
        prompt = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        for piece in chat_model.llm.stream(prompt + prefix):  # type: ignore[attr-defined]
            if piece:
                yield str(piece)

    def prompt_ids(self, messages: Messages) -> list[int]:
        tokenizer = self.tokenizer
        # tokenize=False then encode: transformers 5 returns a BatchEncoding from tokenize=True.
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_prompt_tokens(self, messages: Messages) -> int:
        return len(self.prompt_ids(messages))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label_logprobs(
        self, messages: Messages, adapted: bool, label_texts: Mapping[str, str] = LABEL_TEXTS
    ) -> dict[str, float]:
        return forward_label_logprobs(self.weights(adapted), self.prompt_ids(messages), label_texts)

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "backend": self.name, "weights": self.settings.llm.model, "dtype": "float32",
            "adapter": str(self._adapter) if self._adapter else None, "threads": torch.get_num_threads(),
        }

    def close(self) -> None:
        super().close()
        with self._lock:
            self._loaded.clear()


def forward_label_logprobs(chat: ChatModel, context: list[int], label_texts: Mapping[str, str]) -> dict[str, float]:
    """Label log-probabilities from forward passes computing only the positions that are read.

    One pass serves every one-token label (SmolLM2 tokenises Yes/No/Maybe as one token each); a
    label of several tokens gets its own pass over the prompt plus all but its last token.
    """
    import torch

    scores: dict[str, float] = {}
    next_token: torch.Tensor | None = None
    with torch.inference_mode():
        for label, text in label_texts.items():
            ids = list(chat.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) == 1:
                if next_token is None:
                    logits = chat.model(input_ids=torch.tensor([context]), use_cache=False, logits_to_keep=1).logits
                    next_token = torch.log_softmax(logits[0, -1].float(), dim=-1)
                scores[label] = float(next_token[ids[0]])
                continue
            inputs = torch.tensor([context + ids[:-1]])
            logits = chat.model(input_ids=inputs, use_cache=False, logits_to_keep=len(ids)).logits
            steps = torch.log_softmax(logits[0].float(), dim=-1)
            scores[label] = sum(float(steps[i, token]) for i, token in enumerate(ids))
    return scores
