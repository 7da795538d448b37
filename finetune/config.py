"""The training configuration: a YAML file under finetune/configs/, validated by pydantic.

``--set`` on the command line overrides it key by key. One flag serves two trees: keys of this
config (``lora.rank=8``, ``epochs=1``) change the run, keys of the settings tree
(``data_dir=/tmp/run``, ``llm.model=...``) change where it reads and writes. The two share no
top-level name, so a key goes to exactly one of them, and an unknown key is an error.

Tokens per optimiser step = batch_size x gradient_accumulation x (tokens per example); on the
2-core CPU here one step over 8 x 256 tokens takes about 11 s, which is what the demo budget is
computed from (see configs/demo.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.settings import Settings, SettingsError, deep_merge, read_yaml_mapping, validation_problems


DATA_DIR_MARK = "${data_dir}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraOptions(_Strict):
    rank: int = Field(8, ge=1, le=256, description="LoRA rank r: adapter size grows linearly with it")
    alpha: float = Field(16.0, gt=0, description="scaling alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
        description="module names to adapt (SmolLM2/Llama: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)",
    )


class PreferenceOptions(_Strict):
    """KTO and DPO (``objective: kto | dpo``); SFT ignores them."""

    beta: float = Field(
        0.1, gt=0, description="how far the adapter may move from the base model: higher keeps it closer (KTO, DPO)"
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="KTO: weight of the liked answers' loss (TRL's advice: keep liked x this / disliked "
        "x undesirable_weight between 1 and 4/3)"
    )
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the disliked answers' loss")


class TrainConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-.]{1,64}$", description="adapter name: <data_dir>/adapters/NAME")
    train_files: list[Path] = Field(
        min_length=1,
        description="prepared training JSONL files (prompt/completion); ${data_dir} stands for the settings' data_dir",
    )
    validation_files: list[Path] = Field(min_length=1, description="prepared validation JSONL files")
    objective: Literal["sft", "kto", "dpo"] = Field(
        "sft",
        description="sft: prompt -> completion (prepare's sft/ and raft/); kto: prompt, completion and a "
        "liked/disliked label, unpaired (prepare --from-feedback's kto/); dpo: prompt, chosen, rejected (its dpo/)",
    )
    preference: PreferenceOptions = Field(default_factory=PreferenceOptions)
    lora: LoraOptions = Field(default_factory=LoraOptions)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup: float = Field(0.05, ge=0.0, lt=1.0, description="share of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimiser steps; when set it wins over epochs")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a lower validation loss, and keep the "
        "best epoch's adapter (checkpoints then come once an epoch); null = train all epochs",
    )
    batch_size: int = Field(4, ge=1)
    eval_batch_size: int = Field(4, ge=1)
    gradient_accumulation: int = Field(2, ge=1)
    max_length: int = Field(1024, ge=16, description="longest example in tokens; a longer one is an error, not cut")
    group_by_length: bool = Field(
        True, description="batch examples of similar length: less padding, which on a CPU is pure waste"
    )
    seed: int = 0
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(10, ge=1, description="checkpoint every N steps (for --resume)")
    threads: int | Literal["auto"] = Field(
        "auto", description="torch CPU threads; 'auto': 1 while another job keeps the CPU busy, else all cores"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto': a CUDA GPU when torch sees one, else the CPU"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast (fp32 master weights) or fp32; 'auto': bf16 where the CPU has "
        "AVX-512 BF16 / AMX (or the GPU supports it), fp32 elsewhere (core/hardware.py: emulated bf16 is slow)"
    )
    check_examples: int = Field(2, ge=1, description="validation prompts the finished adapter must answer and stop on")

    @field_validator("train_files", "validation_files", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, Path)) else value

    @model_validator(mode="after")
    def _distinct_files(self) -> "TrainConfig":
        shared = set(self.train_files) & set(self.validation_files)
        if shared:
            raise ValueError(f"{', '.join(map(str, sorted(shared)))} is both a training and a validation file")
        return self

    @model_validator(mode="after")
    def _kto_batches(self) -> "TrainConfig":
        # KTO estimates its KL term by pairing each prompt with its batch neighbour's answer, in file
        # order (TRL requires sequential sampling and more than one example per batch for it).
        if self.objective == "kto" and self.batch_size < 2:
            raise ValueError("objective kto needs batch_size 2 or more (its KL estimate pairs examples within a batch)")
        if self.objective == "kto" and self.group_by_length:
            raise ValueError("objective kto needs group_by_length: false (it reads examples in order, "
                             "pairing each with its neighbour for the KL estimate)")
        return self

    def with_data_dir(self, data_dir: Path) -> "TrainConfig":
        """Expand ``${data_dir}`` in the data paths, so ``--set data_dir=...`` moves data and adapter together."""
        expand = lambda paths: [Path(str(p).replace(DATA_DIR_MARK, str(data_dir))) for p in paths]  # noqa: E731
        return self.model_copy(update={"train_files": expand(self.train_files),
                                       "validation_files": expand(self.validation_files)})

    def fingerprint_fields(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (all but how the run is watched)."""
        return self.model_dump(mode="json", exclude={"threads", "device", "precision", "logging_steps", "check_examples"})


def split_overrides(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route ``--set`` keys to the training config or the settings tree by their first part."""
    config: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for key, value in tree.items():
        if key in TrainConfig.model_fields:
            config[key] = value
        elif key in Settings.model_fields:
            settings[key] = value
        else:
            raise SettingsError(
                f"--set {key}...: not a training key ({', '.join(TrainConfig.model_fields)}) "
                f"nor a settings key ({', '.join(Settings.model_fields)})"
            )
    return config, settings


def load_train_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file < ``--set`` overrides; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"training config {path} does not exist")
    data = read_yaml_mapping(path, "training options")
    try:
        return TrainConfig(**deep_merge(data, overrides or {}))
    except ValidationError as exc:
        raise SettingsError(
            f"invalid training config {path} (with --set overrides): {validation_problems(exc)}"
        ) from exc
