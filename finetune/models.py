"""The chat model as fine-tuning needs it: the tokenizer alone, or plain trainable fp32 weights."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from core.hub import ModelUnavailableError, resolve
from core.llm import ChatModel, load_chat_model, packaged_llm_source
from core.settings import Settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def load_chat_tokenizer(settings: Settings) -> "PreTrainedTokenizerBase":
    """The chat model's tokenizer alone: counting tokens should not need the weights in memory."""
    from transformers import AutoTokenizer

    source = resolve(settings.llm.model, lambda: packaged_llm_source(settings.models_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=source.local)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"tokenizer of {source.name} could not be loaded: {exc}") from exc
    if tokenizer.chat_template is None:
        raise ModelUnavailableError(f"chat model {source.name} has no chat template; use an instruct model")
    return tokenizer


def drop_stale_gguf_marks(model: "PreTrainedModel") -> "PreTrainedModel":
    """Forget a GGUF ``quantization_config`` that no longer describes the weights.

    core.llm converts the packaged GGUF into plain fp32 safetensors, but the saved config.json
    keeps the GGUF's ``quantization_config``; transformers then flags the model as quantized,
    and Trainer refuses to train it ("quantized with GGUF ... do not support training") while
    a merged export would carry the stale flag on. The layers are ordinary fp32 nn.Linear, so
    removing the marks (with transformers' own helper) is all it takes.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and str(quantizer.quantization_config.quant_method.value) == "gguf":
        if any(p.dtype.is_floating_point is False for p in model.parameters()):
            return model  # really quantized weights: leave it to Trainer's own error
        quantizer.remove_quantization_config(model)
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and getattr(config, "_is_quantized", False):
                config._is_quantized = False
        log.debug("dropped the stale GGUF quantization_config of %s", model.name_or_path)
    return model


def load_plain_chat_model(settings: Settings, with_adapter: bool = False) -> ChatModel:
    """core.llm.load_chat_model, with fp32 weights that train and save like any checkpoint."""
    chat = load_chat_model(settings, with_adapter=with_adapter)
    base = chat.model.get_base_model() if hasattr(chat.model, "get_base_model") else chat.model
    drop_stale_gguf_marks(base)
    return chat
