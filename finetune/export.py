"""python -m finetune merge: fold a LoRA adapter into the base weights -> a plain transformers folder.

The merged folder is what a server without PEFT (vLLM, TGI, llama.cpp after conversion) loads.
The usual ways an export goes wrong are a lost chat template or EOS (the model then rambles past
its answer) and weights that quietly differ from what was evaluated. So the folder gets the
adapter's tokenizer (chat template included) and the base generation config (EOS <|im_end|>),
and before it is renamed into place it is reloaded with ``AutoModelForCausalLM`` alone and its
logits compared with the adapter model's on a chat-formatted probe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.hub import ModelUnavailableError
from core.llm import load_chat_model, resolve_adapter
from core.settings import Settings
from finetune.files import refuse_existing, staged_dir

log = logging.getLogger(__name__)

# fp32 merge of a rank-r update: differences come from summation order only (2.5e-4 for the demo).
MAX_LOGIT_DIFF = 1e-3
_PROBE = [
    {"role": "system", "content": "You are a careful assistant for a hospital team."},
    {"role": "user", "content": "What is the maximum dose of Cardivexin?"},
]


@dataclass
class MergeResult:
    out: Path
    max_logit_diff: float


def merge_adapter(settings: Settings, adapter: str, out: Path | None = None, force: bool = False) -> MergeResult:
    import torch
    from transformers import AutoModelForCausalLM

    adapter_settings = settings.model_copy(update={"llm": settings.llm.model_copy(update={"adapter": adapter})})
    adapter_dir = resolve_adapter(adapter_settings)  # a folder or a name; names the paths it tried
    assert adapter_dir is not None
    target = out or settings.data_dir / "merged" / adapter_dir.name
    refuse_existing(target, force)

    # Refuses an adapter trained on another base model (core.llm.attach_adapter).
    chat = load_chat_model(adapter_settings, with_adapter=True)
    tokenizer = chat.tokenizer
    probe = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = chat.model(**probe).logits
    merged = chat.model.merge_and_unload()
    with staged_dir(target, force) as staging:
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        reloaded = AutoModelForCausalLM.from_pretrained(str(staging), local_files_only=True, dtype=torch.float32)
        if getattr(reloaded, "hf_quantizer", None) is not None:
            raise ModelUnavailableError(f"{staging}: the merged model still carries a quantization_config")
        with torch.no_grad():
            got = reloaded(**probe).logits
        diff = float((got - expected).abs().max())
        if diff > MAX_LOGIT_DIFF:
            raise ModelUnavailableError(
                f"the merged model's logits differ from the adapter model's by {diff:.2e} (limit {MAX_LOGIT_DIFF:g})"
            )
    log.info("merged %s into %s (max |logit diff| %.2e)", adapter_dir, target, diff)
    return MergeResult(out=target, max_logit_diff=diff)
