"""Generation backends behind one interface, chosen by ``llm.backend`` here and nowhere else.

- ``llamacpp`` (default): llama-cpp-python in-process on a GGUF (``llm.gguf``), the adapter as
  a GGUF LoRA; on this 2-core CPU, idle, bare llama.cpp decoded 74-94 tokens/s against the
  transformers path's 12.5 (docs/benchmarks.md; on a loaded machine the gap closes).
- ``transformers``: torch fp32 + PEFT, any Hugging Face model (``llm.model``), the weights
  training sees.
- ``openai``: an OpenAI-compatible server (vLLM, TGI, llama.cpp's server, Ollama).

Each backend's module is imported only when chosen; a missing package is an ImportError that
names the setting and what to install.
"""

from __future__ import annotations

from core.generation.base import (
    LABEL_TEXTS, GenerationBackend, LikelihoodUnavailable, Messages, NoAdapterError,
)
from core.settings import Settings

__all__ = [
    "LABEL_TEXTS", "GenerationBackend", "LikelihoodUnavailable", "Messages", "NoAdapterError", "build_backend",
]


def build_backend(settings: Settings) -> GenerationBackend:
    """The backend ``llm.backend`` names (nothing is loaded until a model is first asked for)."""
    match settings.llm.backend:
        case "llamacpp":
            from core.generation.llamacpp import LlamaCppBackend

            return LlamaCppBackend(settings)
        case "transformers":
            from core.generation.transformers import TransformersBackend

            return TransformersBackend(settings)
        case "openai":
            from core.generation.openai import OpenAIBackend

            return OpenAIBackend(settings)
    raise ValueError(f"llm.backend={settings.llm.backend!r}: choose llamacpp, transformers or openai")
