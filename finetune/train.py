"""python -m finetune train: a LoRA adapter for the chat model, with TRL, on a CPU.

``objective`` in the config picks the trainer: ``sft`` (SFTTrainer, prompt -> completion, the
default), ``kto`` (KTOTrainer: unpaired liked / disliked answers, prepare --from-feedback's kto/)
or ``dpo`` (DPOTrainer: chosen / rejected pairs, its dpo/). KTO and DPO train the same LoRA
adapter; their reference model is the base, the same weights with the adapter switched off.

A run, top to bottom:

1. Read the prepared JSONL files (``finetune prepare``) and check every example: prompt and
   completion messages, a non-empty answer, and a length within ``max_length`` tokens counted
   through the chat template. A longer example is an error naming its line, never silently cut
   (TRL would truncate it, and a truncated answer teaches the model to stop mid-sentence).
2. Refuse to overwrite ``<data_dir>/adapters/NAME`` without ``--force``; find the checkpoints
   of an unfinished run in ``<data_dir>/checkpoints/NAME`` (git-ignored) for ``--resume``, and
   refuse to resume one made from other data, another config or another base model.
3. Train: PEFT LoRA through SFTTrainer on the conversational prompt-completion format, whose
   loss covers the completion (the assistant's answer and its <|im_end|>) only. SmolLM2's chat
   template has no {% generation %} markers, so ``assistant_only_loss`` is not an option.
   On the CPU (or a GPU when torch sees one, ``device: auto``), in bf16 autocast with fp32 master
   weights where the hardware runs bf16 natively (``precision: auto``, core/hardware.py), else
   fp32; no gradient checkpointing (135M parameters fit; recomputing activations would cost ~20%
   of the time for nothing).
4. Evaluate the validation loss of the adapter and of the base model (the same model with the
   adapter switched off, so both numbers come from the same code path). KTO and DPO evaluate the
   base before training instead: their loss already switches the adapter off for the reference,
   and PEFT's switch does not nest (the inner one would switch it back on). LoRA starts as the
   identity, so before the first step the model is the base.
5. Write adapter, tokenizer, resolved config, data fingerprint and metrics to a staging folder,
   load the adapter from there with ``core.llm.load_chat_model`` and check it answers a few
   validation prompts and stops at EOS; export it as a llama.cpp LoRA GGUF (what the default
   llamacpp backend serves) if it passes the served = trained check (finetune/gguf.py); then
   rename the folder into place and delete the checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from core.generation.llamacpp import ADAPTER_GGUF
from core.hardware import use_bf16
from core.hub import ModelUnavailableError
from core.llm import load_chat_model
from core.settings import Settings
from finetune.config import TrainConfig
from finetune.files import (
    InputError, iter_jsonl, raise_problems, refuse_existing, sha256_file, staged_dir, write_json,
)
from finetune.threads import training_threads
from finetune.tokens import chat_token_count

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerCallback

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}
RUN_RECORD = "run.json"


# -- the data ---------------------------------------------------------------------------------
@dataclass
class Example:
    where: str  # file:line
    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]  # dpo: the chosen answer
    label: bool | None = None  # kto: liked (True) or disliked (False)
    rejected: list[dict[str, str]] | None = None  # dpo: the rejected answer

    def as_row(self, objective: str) -> dict[str, Any]:
        """The columns the objective's TRL trainer reads; prepare's bookkeeping fields stay behind."""
        if objective == "kto":
            return {"prompt": self.prompt, "completion": self.completion, "label": self.label}
        if objective == "dpo":
            return {"prompt": self.prompt, "chosen": self.completion, "rejected": self.rejected}
        return {"prompt": self.prompt, "completion": self.completion}


# The answer columns of each objective's rows (prepare and prepare --from-feedback write them).
ANSWER_COLUMNS = {"sft": ("completion",), "kto": ("completion",), "dpo": ("chosen", "rejected")}


def _message_problem(message: Any) -> str | None:
    if not isinstance(message, dict) or set(message) != {"role", "content"}:
        return "each message must be an object with exactly 'role' and 'content'"
    if message["role"] not in ROLES:
        return f"unknown role {message['role']!r}"
    if not isinstance(message["content"], str) or not message["content"].strip():
        return f"empty {message['role']} message"
    return None


def read_examples(path: Path, objective: str = "sft") -> list[Example]:
    """The prepared file, checked line by line; every problem is reported with its file:line."""
    path = Path(path)
    answers = ANSWER_COLUMNS[objective]
    shape = ", ".join([f"'prompt': [messages]", *(f"{a!r}: [assistant message]" for a in answers)]
                      + (["'label': true|false"] if objective == "kto" else []))
    examples: list[Example] = []
    problems: list[str] = []
    for number, row in iter_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), list) for k in ("prompt", *answers)):
            problems.append(f"{where}: expected {{{shape}}} (objective {objective})")
            continue
        prompt = row["prompt"]
        problem = next((p for p in map(_message_problem, prompt + [m for a in answers for m in row[a]]) if p), None)
        if problem is None and (not prompt or prompt[-1]["role"] != "user"):
            problem = "the prompt must end with a user message"
        if problem is None:
            problem = next((f"the {a} must be exactly one assistant message" for a in answers
                            if len(row[a]) != 1 or row[a][0]["role"] != "assistant"), None)
        if problem is None and objective == "kto" and not isinstance(row.get("label"), bool):
            problem = f"'label' must be true (liked) or false (disliked), not {row.get('label')!r}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        examples.append(Example(where, prompt, row[answers[0]], label=row.get("label") if objective == "kto" else None,
                                rejected=row["rejected"] if objective == "dpo" else None))
    raise_problems(problems, str(path))
    if not examples:
        raise InputError(f"{path}: no training examples")
    return examples


def check_lengths(tokenizer: "PreTrainedTokenizerBase", examples: list[Example], max_length: int) -> list[int]:
    lengths = [max(chat_token_count(tokenizer, e.prompt + answer) for answer in (e.completion, e.rejected) if answer)
               for e in examples]
    raise_problems(
        [f"{e.where}: {n} tokens, over max_length {max_length} (raise max_length, or prepare with fewer "
         "--distractors)" for e, n in zip(examples, lengths) if n > max_length],
        "examples longer than max_length",
    )
    return lengths


def read_all(paths: list[Path], objective: str = "sft") -> list[Example]:
    return [example for path in paths for example in read_examples(path, objective)]


def data_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """sha256 of every data file: which data made an adapter, and whether a checkpoint may resume."""
    return {
        split: [{"path": str(path), "sha256": sha256_file(path)} for path in paths]
        for split, paths in (("train", config.train_files), ("validation", config.validation_files))
    }


# -- checkpoints ------------------------------------------------------------------------------
def checkpoint_to_resume(folder: Path, run: dict[str, Any], resume: bool, force: bool) -> str | None:
    """The checkpoint to continue from, or None for a fresh start (after checking it may start)."""
    from transformers.trainer_utils import get_last_checkpoint

    record = folder / RUN_RECORD
    if folder.exists() and not resume:
        if not force and get_last_checkpoint(str(folder)) is not None:
            raise InputError(
                f"{folder} holds checkpoints of an unfinished run: pass --resume to continue it, "
                "or --force to discard them and start again"
            )
        shutil.rmtree(folder)
    if resume and folder.exists():
        recorded = json.loads(record.read_text()) if record.is_file() else None
        if recorded != run:
            differing = sorted(k for k in set(run) | set(recorded or {}) if (recorded or {}).get(k) != run.get(k))
            raise InputError(
                f"cannot resume from {folder}: it was made with a different {', '.join(differing) or 'run'} "
                f"(recorded in {record}); train with --force to start again"
            )
        last = get_last_checkpoint(str(folder))
        if last is None:
            log.warning("--resume: no checkpoint in %s yet; starting from step 0", folder)
        else:
            log.info("resuming from %s", last)
        return last
    if resume:
        log.warning("--resume: %s does not exist; starting from step 0", folder)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(run, indent=2, sort_keys=True))
    return None


# -- the run ----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, Any]


def _throughput_meter() -> "TrainerCallback":
    from transformers import TrainerCallback

    class ThroughputMeter(TrainerCallback):
        """Tokens and seconds of this session only (a resumed run restores earlier counts)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step
            self.start_tokens = state.num_input_tokens_seen
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started
            self.tokens = state.num_input_tokens_seen - self.start_tokens
            self.steps = state.global_step - self.start_step

    return ThroughputMeter()


def train(
    config: TrainConfig,
    settings: Settings,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    callbacks: list["TrainerCallback"] | None = None,
) -> TrainResult:
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    started = time.perf_counter()
    config = config.with_data_dir(settings.data_dir)
    adapter_dir = settings.adapters_dir / config.name
    refuse_existing(adapter_dir, force)
    train_rows = read_all(config.train_files, config.objective)
    val_rows = read_all(config.validation_files, config.objective)
    tokenizer = load_chat_model(settings, tokenizer_only=True).tokenizer  # no weights to count tokens
    train_lengths = check_lengths(tokenizer, train_rows, config.max_length)
    check_lengths(tokenizer, val_rows, config.max_length)
    fingerprint = data_fingerprint(config)

    checkpoints = settings.data_dir / "checkpoints" / config.name
    run = {"config": config.fingerprint_fields(), "base_model": settings.llm.model,
           "data": fingerprint}
    last_checkpoint = checkpoint_to_resume(checkpoints, run, resume, force)

    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    bf16 = use_bf16(config.precision, on_gpu)
    threads = training_threads(config.threads)  # read the load before this process adds to it
    chat = load_chat_model(settings, with_adapter=False)  # training starts from the base, whatever llm.adapter says
    torch.set_num_threads(threads)  # after loading: core.llm applies llm.threads
    lora = LoraConfig(
        r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    # What every objective's trainer shares (TRL's configs all extend TrainingArguments).
    shared = dict(
        output_dir=str(checkpoints),
        use_cpu=not on_gpu, bf16=bf16, fp16=False, activation_checkpointing=False,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup,  # a float below 1 is a share of the steps
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        eval_strategy="epoch",
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        logging_steps=config.logging_steps, logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        seed=config.seed, data_seed=config.seed,
        report_to="none", disable_tqdm=not progress,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )

    def as_dataset(rows: list[Example]) -> Dataset:
        # Only the columns TRL reads; prepare's bookkeeping fields stay behind.
        return Dataset.from_list([r.as_row(config.objective) for r in rows])

    stopping: list["TrainerCallback"] = []
    if config.early_stopping_patience:
        # Train until validation loss stops falling (epochs is then the ceiling), keep the best epoch.
        from transformers import EarlyStoppingCallback

        shared |= dict(save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="eval_loss",
                       greater_is_better=False)
        stopping.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    meter = _throughput_meter()
    trainer = make_trainer(
        config, chat, shared, as_dataset(train_rows), as_dataset(val_rows), lora, [meter, *stopping, *(callbacks or [])],
    )
    base_loss = None
    if config.objective != "sft":
        # Before the first step the LoRA update is zero: this is the base model (see the docstring, 4.).
        base_loss = trainer.evaluate(metric_key_prefix="base")["base_loss"]
    output = trainer.train(resume_from_checkpoint=last_checkpoint)

    history = list(trainer.state.log_history)
    evals = [h for h in history if "eval_loss" in h]
    # The end of the last epoch was just evaluated; evaluate again only if training stopped mid-epoch.
    if config.early_stopping_patience and evals:
        final_eval = min(evals, key=lambda h: h["eval_loss"])  # load_best_model_at_end restored this one
    elif evals and evals[-1]["step"] == trainer.state.global_step:
        final_eval = evals[-1]
    else:
        final_eval = trainer.evaluate()
    adapter_loss = final_eval["eval_loss"]
    if base_loss is None:
        with trainer.model.disable_adapter():
            base_loss = trainer.evaluate(metric_key_prefix="base")["base_loss"]
    # Evaluation inside trainer.train() is not training: keep it out of tokens per second.
    eval_seconds = sum(h.get("eval_runtime", 0.0) for h in evals if h["step"] > meter.start_step)
    train_seconds = max(meter.seconds - eval_seconds, 1e-9)
    metrics: dict[str, Any] = {
        "name": config.name,
        "base_model": chat.base_name,
        "train_examples": len(train_rows),
        "validation_examples": len(val_rows),
        "train_tokens_per_epoch": sum(train_lengths),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "resumed_from_step": meter.start_step if last_checkpoint else None,
        "train_loss": round(output.training_loss, 4),
        "train_loss_history": [{"step": h["step"], "loss": round(h["loss"], 4)} for h in history if "loss" in h],
        "val_loss_history": [{"epoch": round(h["epoch"], 3), "step": h["step"], "loss": round(h["eval_loss"], 4)}
                             for h in evals],
        "base_val_loss": round(base_loss, 4),
        "adapter_val_loss": round(adapter_loss, 4),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "tokens_seen": meter.tokens,
        "tokens_per_s": round(meter.tokens / train_seconds, 1),
        "train_wall_s": round(meter.seconds, 1),
        "eval_in_training_s": round(eval_seconds, 1),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "precision": "bf16" if bf16 else "fp32",
        "objective": config.objective,
    }
    if config.objective != "sft":
        # Held-out rewards: how much more likely the adapter makes liked answers than the base does
        # (rewards/chosen > 0) and disliked ones less (rewards/rejected < 0); margins is their gap.
        metrics["validation_rewards"] = {k.removeprefix("eval_"): round(v, 4) for k, v in sorted(final_eval.items())
                                         if k.startswith(("eval_rewards/", "eval_kl"))}

    with staged_dir(adapter_dir, force) as staging:
        save_adapter(trainer.model, chat.tokenizer, chat.base_name, staging)
        resolved = config.model_dump(mode="json") | {"base_model": chat.base_name, "llm_model_setting": settings.llm.model}
        (staging / "train_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        write_json(staging / "data_fingerprint.json", fingerprint)
        adapter_settings = settings.model_copy(update={"llm": settings.llm.model_copy(update={"adapter": str(staging)})})
        # A disliked answer is no model of what to say: the check prompts with liked ones where there are any.
        check_rows = [r for r in val_rows if r.label is not False] or val_rows
        metrics["generation_check"] = generation_check(adapter_settings, check_rows[: config.check_examples])
        metrics["adapter_mb"] = round(sum(f.stat().st_size for f in staging.glob("adapter_model.*")) / 2**20, 2)
        metrics["gguf_export"] = export_for_llamacpp(settings, staging)  # after adapter_mb: PEFT's files only
        metrics["total_wall_s"] = round(time.perf_counter() - started, 1)
        write_json(staging / "metrics.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    log.info("adapter %s: val loss %.4f (base %.4f), %s tokens/s, %.0f s",
             adapter_dir, metrics["adapter_val_loss"], metrics["base_val_loss"], metrics["tokens_per_s"],
             metrics["train_wall_s"])
    return TrainResult(adapter_dir=adapter_dir, metrics=metrics)


def make_trainer(
    config: TrainConfig, chat: Any, shared: dict[str, Any], train_data: Any, eval_data: Any, lora: Any,
    callbacks: list["TrainerCallback"],
) -> Any:
    """The objective's TRL trainer over the base model with a fresh LoRA adapter."""
    common = dict(model=chat.model, train_dataset=train_data, eval_dataset=eval_data, processing_class=chat.tokenizer,
                  peft_config=lora, callbacks=callbacks)
    sampling = "group_by_length" if config.group_by_length else "random"
    if config.objective == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(
            **shared, beta=config.preference.beta, desirable_weight=config.preference.desirable_weight,
            undesirable_weight=config.preference.undesirable_weight,
            train_sampling_strategy="sequential",  # the KL estimate pairs neighbours (prepare shuffled them)
        )
        return KTOTrainer(args=args, **common)
    if config.objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(args=DPOConfig(**shared, beta=config.preference.beta, train_sampling_strategy=sampling),
                          **common)
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**shared, completion_only_loss=True, packing=False, train_sampling_strategy=sampling)
    return SFTTrainer(args=args, **common)


def export_for_llamacpp(settings: Settings, folder: Path) -> dict[str, Any]:
    """The adapter as a llama.cpp LoRA GGUF beside it (llm.backend=llamacpp serves that), kept only
    if it passes finetune.gguf's served = trained check; a refusal keeps the adapter, with the figures."""
    from finetune.gguf import export_gguf

    try:
        return {"ok": True} | export_gguf(settings, str(folder)).as_dict() | {"out": ADAPTER_GGUF}
    except (ModelUnavailableError, InputError) as exc:
        log.error("no GGUF export: %s", exc)
        return {"ok": False, "problem": str(exc)}


def save_adapter(model: Any, tokenizer: "PreTrainedTokenizerBase", base_name: str, folder: Path) -> None:
    """Adapter weights + tokenizer (with its chat template), and nothing machine-specific."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    config_file = folder / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    # PEFT records the local folder the base was loaded from (/home/.../data/models/...); the
    # public name travels between machines and is what core.llm.attach_adapter checks against.
    adapter_config["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template


def generation_check(settings: Settings, rows: list[Example]) -> dict[str, Any]:
    """Load the adapter as the chat app will and make sure it answers and stops at EOS."""
    import torch

    chat = load_chat_model(settings, with_adapter=True)
    tokenizer, model = chat.tokenizer, chat.model
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    samples = []
    for row in rows:
        inputs = tokenizer.apply_chat_template(
            row.prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=settings.llm.max_new_tokens, do_sample=False,
                repetition_penalty=settings.llm.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
            )
        new = output[0, inputs["input_ids"].shape[1]:].tolist()
        samples.append({
            "where": row.where,
            "expected": row.completion[0]["content"],
            "output": tokenizer.decode(new, skip_special_tokens=True).strip(),
            "new_tokens": len(new),
            "stopped_at_eos": bool(new) and new[-1] in eos_ids,
        })
    problem = next((
        f"{s['where']}: " + ("no EOS within llm.max_new_tokens" if not s["stopped_at_eos"] else "empty answer")
        for s in samples if not s["stopped_at_eos"] or not s["output"]
    ), None)
    return {"ok": problem is None, "problem": problem, "samples": samples}
