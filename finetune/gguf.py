"""python -m finetune export ADAPTER --gguf: the PEFT LoRA adapter as a llama.cpp LoRA GGUF, checked.

The file llama.cpp loads with ``Llama(..., lora_path=...)`` (llama-server ``--lora``): metadata
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted
matrix two tensors, ``blk.N.<tensor>.weight.lora_a`` (PEFT's lora_A, rank x in) and ``.lora_b``
(lora_B, out x rank), named through the ``gguf`` package's own HF-to-GGUF tensor map. llama.cpp
computes ``W x + (alpha / rank) * B (A x)``: PEFT's scale, so the two agree by construction.
llama.cpp's convert_lora_to_gguf.py (which this follows, read upstream: no installed package
ships it) needs the base model's HF config and a checkout of llama.cpp; here the layout comes
from the base GGUF itself, so any GGUF of the adapter's base model works, offline.

One layout detail matters: llama.cpp's converter stores a llama model's q_proj and k_proj rows
permuted for its rotary embedding (``permute`` below), so the rows of those lora_B matrices are
permuted the same way. An export that gets such a detail wrong loads without complaint and
answers differently, which is why every export is checked before it is kept (served = trained):

- the chat template survives: llama.cpp renders and tokenises each check prompt with the base
  GGUF's template to exactly the token ids transformers' tokenizer gives, and both stop at the
  same end-of-turn token (<|im_end|> for SmolLM2);
- greedy answers agree: on the adapter's validation prompts (the files named in its
  train_config.yaml, when they exist here; else ``FALLBACK_PROMPTS`` from core.prompts), the
  first ``CHECK_TOKENS`` tokens of llama.cpp + LoRA GGUF and of transformers + PEFT are the same
  for at least ``MIN_AGREEMENT`` of the prompts, and the base model's likewise (transformers
  runs the de-quantised weights of the same GGUF, llama.cpp its quantised ones, so exact
  agreement is not guaranteed: the figures are reported either way). Greedy without repetition
  penalty, because the two libraries apply it differently (transformers also penalises prompt
  tokens): the check is about the weights, the template and EOS, not the samplers.

Otherwise the export is refused with the figures and nothing is written.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.generation.llamacpp import ADAPTER_GGUF, LlamaInstance, open_llama, resolve_gguf
from core.hub import ModelUnavailableError
from core.llm import load_chat_model, resolve_adapter
from core.prompts import ContextChunk, build_messages
from core.settings import Settings, read_yaml_mapping
from finetune.files import InputError, iter_jsonl, refuse_existing

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file and tensor count at INFO

CHECK_TOKENS = 32
MIN_AGREEMENT = 0.9
DEFAULT_CHECK_PROMPTS = 16

# Chat prompts for adapters whose validation files are not on this machine (the committed demo
# adapter's were prepared from a local index): both prompt shapes the chat sends.
_NOTE = ContextChunk(
    "Cardivexin 10 mg once daily is the usual starting dose for adults with hypertension. Review "
    "potassium and creatinine within 2 weeks of starting it in patients with CKD.",
    "Cardivexin monograph", "monographs/cardivexin.md", section="Dosing",
)
FALLBACK_PROMPTS = [
    build_messages("What is the starting dose of Cardivexin?", [_NOTE]),
    build_messages("When should potassium be checked after starting Cardivexin?", [_NOTE]),
    build_messages("What is the door-to-balloon target for STEMI?", [_NOTE]),
    build_messages("What does HTN stand for?", None),
    build_messages("What does eGFR mean?", None),
    build_messages("Reply with the single word: yes.", None),
    build_messages("How often should hands be washed on a ward?", None),
    build_messages("And for a patient with CKD?", [_NOTE], [("What is the starting dose of Cardivexin?",
                                                            "10 mg once daily. [1]")]),
]


class ExportRefused(ModelUnavailableError):
    """The export was written but failed the served = trained check; nothing was kept."""


@dataclass
class CheckResult:
    prompts_from: str
    prompts: int
    adapted_agreement: float
    base_agreement: float
    template_identical: bool
    eos: str
    stopped_at_eos: dict[str, int] = field(default_factory=dict)  # within CHECK_TOKENS, per path
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.template_identical and self.adapted_agreement >= MIN_AGREEMENT
                and self.base_agreement >= MIN_AGREEMENT)

    def summary(self) -> str:
        return (f"greedy first {CHECK_TOKENS} tokens agree on {self.adapted_agreement:.0%} of {self.prompts} prompts "
                f"with the adapter and {self.base_agreement:.0%} without (at least {MIN_AGREEMENT:.0%} needed); "
                f"chat template {'identical' if self.template_identical else 'DIFFERS'}; EOS {self.eos}; "
                f"prompts: {self.prompts_from}")


@dataclass
class GGUFExport:
    out: Path
    tensors: int
    rank: int
    alpha: float
    bytes: int
    check: CheckResult

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "tensors": self.tensors, "rank": self.rank, "alpha": self.alpha,
                "mb": round(self.bytes / 2**20, 2), "check": asdict(self.check) | {"ok": self.check.ok}}


# -- writing ----------------------------------------------------------------------------------
def permute(weights: "np.ndarray", n_head: int) -> "np.ndarray":
    """Rows of a llama q/k projection in llama.cpp's order (its converter's permute, rotary halves)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _field(reader: Any, key: str) -> Any:
    found = reader.get_field(key)
    return found.contents() if found is not None else None


def write_lora_gguf(adapter_dir: Path, base_gguf: Path, out: Path, dtype: str = "f16",
                    alpha_scale: float = 1.0) -> tuple[int, int, float]:
    """Write ``adapter_dir``'s PEFT LoRA as a llama.cpp LoRA GGUF for ``base_gguf``'s model.

    ``alpha_scale`` multiplies the recorded alpha; anything but 1 makes a broken export (the
    tests use it to show the check refuses one). Returns (tensors, rank, alpha written).
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise InputError(f"{adapter_dir}: only plain LoRA adapters can be served by llama.cpp (not DoRA or {config.get('peft_type')})")
    if config.get("modules_to_save"):
        raise InputError(f"{adapter_dir}: modules_to_save {config['modules_to_save']} have no llama.cpp LoRA form")
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise InputError(f"{adapter_dir}: no adapter_model.safetensors")
    rank = int(config["r"])
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r
    alpha *= alpha_scale

    base = gguf.GGUFReader(str(base_gguf))
    arch_name = str(_field(base, "general.architecture"))
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise InputError(f"{base_gguf}: unknown architecture {arch_name!r} for the gguf package's tensor map")
    n_blocks = int(_field(base, f"{arch_name}.block_count"))
    heads = int(_field(base, f"{arch_name}.attention.head_count"))
    kv_heads = int(_field(base, f"{arch_name}.attention.head_count_kv") or heads)
    base_shapes = {t.name: tuple(int(x) for x in t.shape) for t in base.tensors}  # ggml order: (in, out)
    names = gguf.get_tensor_name_map(arch, n_blocks)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                module = key.removeprefix("base_model.model.")[: -len(marker)]
                pairs.setdefault(module, {})[part] = tensor.astype(np.float32)
                break
        else:
            raise InputError(f"{weights_file}: {key} is not a LoRA A/B matrix (embeddings or biases cannot be served)")

    writer = gguf.GGUFWriter(str(out), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_string("general.name", f"ragtune LoRA {adapter_dir.name} (r={rank}) for {_field(base, 'general.name')}")
    written = 0
    for module, ab in sorted(pairs.items()):
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None or set(ab) != {"lora_A", "lora_B"}:
            raise InputError(f"{weights_file}: {module} has no {arch_name} GGUF tensor (or lacks lora_A/lora_B)")
        lora_a, lora_b = ab["lora_A"], ab["lora_B"]  # (r, in), (out, r)
        if arch_name == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):
            lora_b = permute(lora_b, heads if "attn_q" in target else kv_heads)
        expected = base_shapes.get(target)
        if expected is None or expected != (lora_a.shape[1], lora_b.shape[0]):
            raise InputError(f"{module}: LoRA for a {lora_a.shape[1]} x {lora_b.shape[0]} matrix, but {base_gguf.name}'s "
                             f"{target} is {expected}: the adapter was trained on another base model")
        out_type = np.float16 if dtype == "f16" else np.float32
        writer.add_tensor(f"{target}.lora_a", lora_a.astype(out_type))
        writer.add_tensor(f"{target}.lora_b", lora_b.astype(out_type))
        written += 2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written, rank, alpha


# -- checking ---------------------------------------------------------------------------------
def check_prompts(adapter_dir: Path, limit: int) -> tuple[list[list[dict[str, str]]], str]:
    """The adapter's validation prompts (train_config.yaml's validation_files, as far as they exist
    here), or ``FALLBACK_PROMPTS``; at most ``limit``, taken evenly across the files."""
    config_file = adapter_dir / "train_config.yaml"
    files: list[Path] = []
    if config_file.is_file():
        files = [Path(p) for p in read_yaml_mapping(config_file, "training settings").get("validation_files") or []]
    present = [f for f in files if f.is_file()]
    prompts = []
    for file in present:
        prompts.append([row["prompt"] for _, row in iter_jsonl(file) if isinstance(row, dict) and row.get("prompt")])
    if not any(prompts):
        return FALLBACK_PROMPTS[:limit], f"{len(FALLBACK_PROMPTS[:limit])} fixed prompts (finetune.gguf.FALLBACK_PROMPTS; " \
            f"no validation file of {config_file.name} is here)"
    picked = []
    while len(picked) < limit and any(prompts):
        for rows in prompts:  # round robin: RAFT and SFT prompts alike
            if rows and len(picked) < limit:
                picked.append(rows.pop(0))
    return picked, f"{len(picked)} validation prompts of {', '.join(str(f) for f in present)}"


def _hf_greedy(model: Any, tokenizer: Any, ids: list[int], eos: set[int]) -> list[int]:
    import torch

    with torch.inference_mode():
        output = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=CHECK_TOKENS, do_sample=False, repetition_penalty=1.0,
                                eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id or min(eos))
    return output[0, len(ids):].tolist()


def _llama_greedy(instance: LlamaInstance, ids: list[int], eos: int) -> list[int]:
    new: list[int] = []
    with instance.lock:
        instance.llama.reset()
        for token in instance.llama.generate(ids, temp=0.0, repeat_penalty=1.0, top_k=1):
            new.append(int(token))
            if token == eos or len(new) >= CHECK_TOKENS:
                break
    return new


def served_equals_trained(settings: Settings, adapter_dir: Path, lora_gguf: Path, base_gguf: Path,
                          limit: int = DEFAULT_CHECK_PROMPTS) -> CheckResult:
    """Greedy answers of llama.cpp (base GGUF + LoRA GGUF) against transformers + PEFT; see the module doc."""
    prompts, prompts_from = check_prompts(adapter_dir, limit)
    adapter_settings = settings.model_copy(update={"llm": settings.llm.model_copy(update={"adapter": str(adapter_dir)})})
    trained = load_chat_model(adapter_settings, with_adapter=True)  # refuses an adapter of another base model
    tokenizer = trained.tokenizer
    eos = trained.model.generation_config.eos_token_id
    hf_eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    served = {adapted: LlamaInstance(open_llama(base_gguf, settings, lora_gguf if adapted else None))
              for adapted in (False, True)}
    try:
        llama_eos = served[False].llama.token_eos()
        eos_text = served[False].eos_text
        same_eos = llama_eos in hf_eos and tokenizer.convert_ids_to_tokens(llama_eos) == eos_text
        template_identical = same_eos
        agree = {True: 0, False: 0}
        stopped = {"llamacpp+lora": 0, "transformers+peft": 0}
        disagreements: list[dict[str, Any]] = []
        for messages in prompts:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            hf_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            llama_ids = served[False].prompt_tokens(messages)
            template_identical &= hf_ids == llama_ids
            for adapted in (True, False):
                if adapted:
                    expected = _hf_greedy(trained.model, tokenizer, hf_ids, hf_eos)
                else:
                    with trained.model.disable_adapter():
                        expected = _hf_greedy(trained.model, tokenizer, hf_ids, hf_eos)
                got = _llama_greedy(served[adapted], llama_ids, llama_eos)
                if adapted:
                    stopped["transformers+peft"] += bool(expected) and expected[-1] in hf_eos
                    stopped["llamacpp+lora"] += bool(got) and got[-1] == llama_eos
                if got == expected:
                    agree[adapted] += 1
                elif len(disagreements) < 3:
                    disagreements.append({
                        "adapted": adapted, "question": str(messages[-1]["content"])[-120:],
                        "transformers": tokenizer.decode(expected), "llamacpp": tokenizer.decode(got),
                    })
    finally:
        for instance in served.values():
            instance.llama.close()
    n = max(len(prompts), 1)
    return CheckResult(
        prompts_from=prompts_from, prompts=len(prompts), adapted_agreement=round(agree[True] / n, 4),
        base_agreement=round(agree[False] / n, 4), template_identical=template_identical,
        eos=f"{eos_text!r} (id {llama_eos}){'' if same_eos else ' differs from the tokenizer eos'}",
        stopped_at_eos=stopped, disagreements=disagreements,
    )


def export_gguf(settings: Settings, adapter: str, out: Path | None = None, *, force: bool = False,
                dtype: str = "f16", check_limit: int = DEFAULT_CHECK_PROMPTS, alpha_scale: float = 1.0) -> GGUFExport:
    """Write, check and keep ``<adapter>/adapter_model.gguf`` (or ``out``); refused with figures if unfaithful."""
    adapter_settings = settings.model_copy(update={"llm": settings.llm.model_copy(update={"adapter": adapter})})
    adapter_dir = resolve_adapter(adapter_settings)
    assert adapter_dir is not None
    target = out or adapter_dir / ADAPTER_GGUF
    refuse_existing(target, force)
    base_gguf = resolve_gguf(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as staging:
        staged = Path(staging) / target.name
        tensors, rank, alpha = write_lora_gguf(adapter_dir, base_gguf, staged, dtype=dtype, alpha_scale=alpha_scale)
        check = served_equals_trained(settings, adapter_dir, staged, base_gguf, check_limit)
        log.info("%s: %s", target, check.summary())
        if not check.ok:
            raise ExportRefused(f"{adapter_dir}: the GGUF export was refused (nothing written): {check.summary()}; "
                                f"first disagreements: {json.dumps(check.disagreements, ensure_ascii=False)[:1500]}")
        size = staged.stat().st_size
        staged.replace(target)
    return GGUFExport(out=target, tensors=tensors, rank=rank, alpha=alpha, bytes=size, check=check)
