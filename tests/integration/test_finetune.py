"""Fine-tuning with the real packaged models (SmolLM2-135M, all-MiniLM-L6-v2) and local-mode Qdrant.

Sizes are tiny (a few steps, short sequences) so the module runs in a few minutes on 2 cores;
what is asserted is what must hold at any size: LoRA weights move and base weights do not, the
loss falls on a fixed set, --resume continues from the checkpoint, prepare is deterministic with
the configured shares, the saved adapter loads through core.llm and stops at EOS, and the
merged export loads with plain transformers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from core.hub import ModelUnavailableError
from core.llm import load_chat_model
from core.quotes import split_quotes
from core.prompts import NOT_COVERED, SYSTEM_WITH_DOCUMENTS, build_messages
from core.settings import Settings, load_settings
from finetune.config import TrainConfig
from finetune.data import PrepareOptions, prepare
from finetune.files import InputError, OutputExistsError, sha256_file
from finetune.train import train
from tests.conftest import DEMO

# Documents the prepare and embedding tests index, and whose Q/A records they use.
INDEXED = ["monographs", "faq/staff-faq.jsonl", "protocols/chest-pain-acs.md", "handbooks/renal-dosing-handbook.pdf"]


def make_settings(data_dir: Path, **overrides) -> Settings:
    empty = data_dir / "empty-settings.yaml"
    empty.write_text("")
    tree = {"data_dir": str(data_dir), "qdrant": {"path": ":memory:"}, "llm": {"max_new_tokens": 48}}
    for key, value in overrides.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return load_settings(empty, tree)


@pytest.fixture(scope="module")
def index(session_data_dir: Path, embedder):
    """Part of the demo knowledge base in a temporary store, shared by this module."""
    from core.store import open_store
    from ingest.service import build_indexer

    settings = make_settings(session_data_dir)
    client = open_store(settings)
    report = build_indexer(settings, client, embedder).run([DEMO / p for p in INDEXED], progress=False)
    assert report.ok, report.failed
    yield settings, client
    client.close()


@pytest.fixture(scope="module")
def demo_qa(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Demo Q/A records whose gold documents are indexed above (plus the unanswerable ones)."""
    folder = tmp_path_factory.mktemp("qa")
    covered = tuple(p.split("/")[0] + "/" if "." not in p else p for p in INDEXED)
    files = []
    for split, answerable, unanswerable in (("train", 20, 4), ("validation", 6, 2)):
        lines = (DEMO / "qa" / f"{split}.jsonl").read_text().splitlines()
        gold = [x for x in lines if (g := json.loads(x)["gold_doc"]) and g.startswith(covered)][:answerable]
        none = [x for x in lines if json.loads(x)["gold_doc"] is None][:unanswerable]
        path = folder / f"{split}.jsonl"
        path.write_text("\n".join(gold + none) + "\n")
        files.append(path)
    return files[0], files[1]


# -- prepare ----------------------------------------------------------------------------------
def test_prepare_is_deterministic_and_shares_match(index, embedder, demo_qa, tmp_path: Path) -> None:
    settings, client = index
    train_qa, val_qa = demo_qa
    options = PrepareOptions(distractors=2, no_gold_share=0.25, seed=5)
    first = prepare(settings, train_qa, tmp_path / "a", options, store=client, embedder=embedder, val_qa_path=val_qa)
    second = prepare(settings, train_qa, tmp_path / "b", options, store=client, embedder=embedder, val_qa_path=val_qa)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["raft/train.jsonl", "raft/validation.jsonl", "sft/train.jsonl",
                                       "sft/validation.jsonl", "summary.json"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first.summary == second.summary

    records = {r["id"]: r for r in map(json.loads, train_qa.read_text().splitlines())}
    rows = [json.loads(line) for line in (tmp_path / "a" / "raft" / "train.jsonl").read_text().splitlines()]
    answerable = [r for r in rows if records[r["id"]]["gold_doc"] is not None]
    no_gold = [r for r in answerable if r["case"] == "no_gold"]
    assert len(no_gold) == round(0.25 * len(answerable))
    assert first.summary["raft"]["train"]["no_gold_share"] == round(len(no_gold) / len(answerable), 4)
    for row in rows:
        record = records[row["id"]]
        assert row["prompt"][0]["content"] == SYSTEM_WITH_DOCUMENTS
        shown = row["prompt"][-1]["content"]
        # Narrowed as the chat narrows: only chunks with a selected evidence unit, under their number.
        numbers = [int(n) for n in re.findall(r'<document n="(\d+)"', shown)]
        assert numbers == sorted(numbers) and set(numbers) <= {1, 2, 3} and len(row["sources"]) == 3
        target = row["completion"][0]["content"]
        gold_sources = [s for s in row["sources"] if record["gold_doc"] and s.endswith("/" + record["gold_doc"])]
        if row["case"] == "gold":
            assert row["sources"][row["gold"] - 1].endswith("/" + record["gold_doc"])
            quotes, body = split_quotes(target)
            assert len(quotes) == row["quotes"]
            # Quote, then answer: every quote is copied from the prompt, and the answer cites it.
            assert all(text in shown for _, text in quotes)
            assert body == f"{record['answer']} [{quotes[0][0] if quotes else row['gold']}]"
            if quotes:
                assert f'<document n="{row["gold"]}"' in shown
        else:
            assert target == NOT_COVERED and not gold_sources
    sft_rows = [json.loads(line) for line in (tmp_path / "a" / "sft" / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in sft_rows] == [r["id"] for r in rows]
    assert all(r["prompt"][-1]["content"] == records[r["id"]]["question"] for r in sft_rows)
    tokens = first.summary["raft"]["train"]["tokens"]
    assert 0 < tokens["min"] <= tokens["median"] <= tokens["max"] <= settings.llm.context_window


def test_prepare_names_the_bad_record_and_writes_nothing(index, embedder, demo_qa, tmp_path: Path) -> None:
    settings, client = index
    train_qa, val_qa = demo_qa
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train_qa.read_text() + json.dumps(
        {"id": "x-1", "question": "Where?", "answer": "Here.", "gold_doc": "monographs/absent.md"}) + "\n")
    line = len(bad.read_text().splitlines())
    with pytest.raises(InputError, match=rf"{bad}:{line}: gold_doc 'monographs/absent.md'"):
        prepare(settings, bad, tmp_path / "out", PrepareOptions(), store=client, embedder=embedder, val_qa_path=val_qa)
    with pytest.raises(InputError, match="over the limit of 200"):
        prepare(settings, train_qa, tmp_path / "out", PrepareOptions(max_tokens=200), store=client,
                embedder=embedder, val_qa_path=val_qa)
    assert list(tmp_path.iterdir()) == [bad]


# -- LoRA training ----------------------------------------------------------------------------
FACTS = [
    ("What colour is the Northwind staff badge?", "Teal."),
    ("Which extension reaches Security?", "Extension 2500."),
    ("When does the pharmacy close on Sundays?", "At 16:00."),
    ("Who approves Quorivelle after 72 hours?", "The microbiology consultant."),
]


def write_examples(path: Path, pairs: list[tuple[str, str]]) -> Path:
    rows = [{"prompt": build_messages(q, None), "completion": [{"role": "assistant", "content": a}]}
            for q, a in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(folder: Path, name: str, **fields) -> TrainConfig:
    train_file = write_examples(folder / f"{name}-train.jsonl", FACTS)
    val_file = write_examples(folder / f"{name}-val.jsonl", FACTS[:2])
    return TrainConfig(**{
        "name": name, "train_files": [train_file], "validation_files": [val_file],
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}, "learning_rate": 2e-3, "lr_scheduler": "constant",
        "warmup": 0.0, "batch_size": 4, "gradient_accumulation": 1, "eval_batch_size": 2, "max_length": 128,
        "max_steps": 6, "save_steps": 3, "logging_steps": 1, "check_examples": 1, **fields,
    })


class WeightWatcher:
    """A TrainerCallback that snapshots the weights when training starts and compares at the end."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Watcher(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_train_end(self, args, state, control, model=None, **kwargs):
                after = dict(model.named_parameters())
                self.changed = {n for n, p in self.before.items() if not p.equal(after[n].detach())}
                self.lora = {n for n in self.before if "lora_" in n}

        return Watcher()


@pytest.fixture(scope="module")
def trained(session_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("train")
    # The session data dir holds the converted SmolLM2 (converted once per test session).
    settings = make_settings(session_data_dir, llm={"max_new_tokens": 24})
    config = tiny_config(folder, "tiny")
    watcher = WeightWatcher()
    result = train(config, settings, progress=False, callbacks=[watcher])
    return settings, config, result, watcher


def test_lora_weights_change_and_base_weights_do_not(trained) -> None:
    _, _, _, watcher = trained
    lora_b = {n for n in watcher.lora if "lora_B" in n}
    assert lora_b and lora_b <= watcher.changed  # B starts at zero; every one has moved
    assert watcher.changed <= watcher.lora, sorted(watcher.changed - watcher.lora)[:5]


def test_training_loss_falls_and_outputs_are_complete(trained) -> None:
    settings, config, result, _ = trained
    losses = [h["loss"] for h in result.metrics["train_loss_history"]]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]
    assert result.metrics["adapter_val_loss"] < result.metrics["base_val_loss"]
    folder = result.adapter_dir
    assert folder == settings.adapters_dir / "tiny"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "train_config.yaml",
            "data_fingerprint.json", "metrics.json"} <= names
    assert not any(n.startswith("checkpoint") for n in names)
    assert not (settings.data_dir / "checkpoints" / "tiny").exists()
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    fingerprint = json.loads((folder / "data_fingerprint.json").read_text())
    assert fingerprint["train"][0]["sha256"] == sha256_file(config.train_files[0])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["tokens_per_s"] > 0 and metrics["adapter_mb"] < 20
    with pytest.raises(OutputExistsError, match="--force"):
        train(config, settings, progress=False)


def test_saved_adapter_loads_through_core_and_stops_at_eos(trained) -> None:
    import torch

    settings, _, result, _ = trained
    assert result.metrics["generation_check"]["ok"], result.metrics["generation_check"]
    adapted = settings.model_copy(update={"llm": settings.llm.model_copy(update={"adapter": str(result.adapter_dir)})})
    chat = load_chat_model(adapted)
    assert chat.adapter_path == result.adapter_dir
    inputs = chat.tokenizer.apply_chat_template(build_messages(FACTS[1][0], None), add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = chat.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:]
    assert new[-1].item() == chat.tokenizer.eos_token_id  # it stopped by itself, before the limit
    # Trained on two- and three-word answers, it answers briefly (the base model writes paragraphs).
    assert 1 < len(new) <= 12 and chat.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_resume_continues_from_the_checkpoint(trained, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    settings = trained[0]
    config = tiny_config(tmp_path, "resumable", max_steps=4, save_steps=2)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt  # after checkpoint-2 was written, like Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        train(config, settings, progress=False, callbacks=[Crash()])
    checkpoints = settings.data_dir / "checkpoints" / "resumable"
    assert (checkpoints / "checkpoint-2").is_dir() and not (settings.adapters_dir / "resumable").exists()
    with pytest.raises(InputError, match="--resume"):
        train(config, settings, progress=False)
    with pytest.raises(InputError, match="different config"):
        train(config.model_copy(update={"learning_rate": 1e-4}), settings, resume=True, progress=False)

    result = train(config, settings, resume=True, progress=False)
    assert result.metrics["resumed_from_step"] == 2 and result.metrics["steps"] == 4
    assert [h["step"] for h in result.metrics["train_loss_history"]] == [1, 2, 3, 4]
    assert not checkpoints.exists()


def test_too_long_examples_are_refused_before_training(trained, tmp_path: Path) -> None:
    settings = trained[0]
    config = tiny_config(tmp_path, "short", max_length=40)
    with pytest.raises(InputError) as caught:
        train(config, settings, progress=False)
    assert f"{config.train_files[0]}:1:" in str(caught.value) and "over max_length 40" in str(caught.value)
    assert not (settings.adapters_dir / "short").exists()


# -- the llama.cpp export: served = trained ----------------------------------------------------
def test_gguf_export_serves_what_was_trained(trained) -> None:
    from core.generation.llamacpp import ADAPTER_GGUF, LlamaCppBackend

    settings, _, result, _ = trained
    export = result.metrics["gguf_export"]  # train() exported and checked it
    assert export["ok"], export
    check = export["check"]
    assert check["template_identical"] and check["prompts"] == 2 and "tiny-val.jsonl" in check["prompts_from"]
    assert check["adapted_agreement"] >= 0.9 and check["base_agreement"] >= 0.9
    assert check["stopped_at_eos"]["llamacpp+lora"] == check["stopped_at_eos"]["transformers+peft"] == 2
    assert (result.adapter_dir / ADAPTER_GGUF).is_file() and export["rank"] == 4 and export["alpha"] == 8

    import gguf

    reader = gguf.GGUFReader(str(result.adapter_dir / ADAPTER_GGUF))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    names = {t.name for t in reader.tensors}
    # q, k, v and o of 30 blocks (the tiny config's targets), an A and a B each
    assert len(names) == 30 * 4 * 2 and {"blk.0.attn_q.weight.lora_a", "blk.29.attn_output.weight.lora_b"} <= names

    # What llm.backend=llamacpp serves in hybrid and finetuned, against transformers + PEFT, both
    # greedy without repetition penalty (the two libraries apply it to different tokens).
    import torch

    greedy = {"adapter": str(result.adapter_dir), "repetition_penalty": 1.0}
    adapted = settings.model_copy(update={"llm": settings.llm.model_copy(update=greedy)})
    messages = build_messages(FACTS[1][0], None)
    trained_model = load_chat_model(adapted)
    inputs = trained_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)
    with torch.no_grad():
        output = trained_model.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    expected = trained_model.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    backend = LlamaCppBackend(adapted)
    try:
        chunks = list(backend.chat_model(True, 24).stream(messages))
        answer = "".join(str(c.content) for c in chunks)
        assert answer.strip() == expected.strip() and len(chunks) < 24, (answer, expected)  # and it stopped at EOS
    finally:
        backend.close()


def test_an_export_that_serves_something_else_is_refused(trained, tmp_path: Path) -> None:
    from finetune.gguf import ExportRefused, export_gguf

    settings, _, result, _ = trained
    out = tmp_path / "broken.gguf"
    # The adapter's update subtracted instead of added: the file loads in llama.cpp without a word.
    with pytest.raises(ExportRefused, match=r"agree on \d+% of 2 prompts with the adapter") as refused:
        export_gguf(settings, str(result.adapter_dir), out, alpha_scale=-1.0)
    assert "100% without" in str(refused.value)  # the base model still agrees: the adapter is what broke
    assert not out.exists() and not list(tmp_path.iterdir())


# -- merge and base-model checks --------------------------------------------------------------
def test_merged_model_loads_with_plain_transformers(trained) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.export import merge_adapter

    settings, _, result, _ = trained
    merged = merge_adapter(settings, "tiny")
    assert merged.out == settings.data_dir / "merged" / "tiny" and merged.max_logit_diff < 1e-3
    config = json.loads((merged.out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(merged.out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(merged.out, local_files_only=True)
    inputs = tokenizer.apply_chat_template(build_messages(FACTS[1][0], None), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert output[0, -1].item() == tokenizer.eos_token_id == model.generation_config.eos_token_id
    with pytest.raises(OutputExistsError):
        merge_adapter(settings, "tiny")


def test_adapter_of_another_base_model_is_refused(trained, tmp_path: Path) -> None:
    from finetune.export import merge_adapter

    settings, _, result, _ = trained
    foreign = tmp_path / "foreign"
    shutil.copytree(result.adapter_dir, foreign)
    config_file = foreign / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                           "meta-llama/Llama-3.2-1B-Instruct"))
    adapted = settings.model_copy(update={"llm": settings.llm.model_copy(update={"adapter": str(foreign)})})
    with pytest.raises(ModelUnavailableError, match="Llama-3.2-1B"):
        load_chat_model(adapted)
    with pytest.raises(ModelUnavailableError, match=str(foreign)):
        merge_adapter(settings, str(foreign), out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# -- embeddings -------------------------------------------------------------------------------
def test_embedding_finetune_reports_recall_before_and_after(index, embedder, demo_qa) -> None:
    from core.embeddings import load_embedder
    from core.settings import EmbeddingSettings
    from finetune.embeddings import EmbeddingOptions, train_embedder

    settings, client = index
    train_qa, val_qa = demo_qa
    result = train_embedder(settings, train_qa, "tiny-abbrev", EmbeddingOptions(epochs=1, batch_size=8, k=[1, 5]),
                            val_qa_path=val_qa, glossaries=[DEMO / "glossary"], store=client, embedder=embedder)
    metrics = result.metrics
    assert result.out == settings.data_dir / "embedders" / "tiny-abbrev"
    assert metrics["abbreviation_variant_pairs"] > 0 and metrics["train_pairs"] > metrics["train_questions"]
    for when in ("recall_before", "recall_after"):
        assert set(metrics[when]["questions"]) == {"recall@1", "recall@5"}
        assert 0.0 <= metrics[when]["questions"]["recall@1"] <= metrics[when]["questions"]["recall@5"] <= 1.0
    loaded = load_embedder(EmbeddingSettings(model=str(result.out)))
    assert loaded.info.dimension == embedder.info.dimension and loaded.info.name == str(result.out)
    assert json.loads((result.out / "metrics.json").read_text())["name"] == "tiny-abbrev"


def test_embedding_lora_saves_the_adapter_alone_and_loads_as_the_tuned_embedder(index, embedder, demo_qa) -> None:
    """--lora: a few MB of adapter in <data_dir>/adapters/NAME, not a copy of the model; it loads
    as retrieval.tuned_embedder on the base and moves the vectors; the base embedder is untouched."""
    from core.embeddings import load_tuned_embedder
    from finetune.embeddings import EmbeddingOptions, train_embedder

    settings, client = index
    train_qa, val_qa = demo_qa
    probe = "door-to-balloon time for STEMI"
    base_vector = embedder.embeddings.embed_query(probe)
    options = EmbeddingOptions(epochs=1, batch_size=8, k=[1], lora=True, lora_rank=4, learning_rate=1e-3)
    result = train_embedder(settings, train_qa, "tiny-lora", options, val_qa_path=val_qa,
                            glossaries=[DEMO / "glossary"], store=client, embedder=embedder, force=True)
    assert result.out == settings.adapters_dir / "tiny-lora"
    files = {f.name: f.stat().st_size for f in result.out.iterdir()}
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "embedder.json", "metrics.json"}
    assert files["adapter_model.safetensors"] < 2 * 2**20  # rank 4: KBs, not the 90 MB model
    assert json.loads((result.out / "embedder.json").read_text())["base_embedder"] == embedder.info.name
    assert result.metrics["kind"] == "lora"

    tuned = load_tuned_embedder(settings.model_copy(update={"retrieval": settings.retrieval.model_copy(
        update={"tuned_embedder": str(result.out)})}), embedder)
    assert tuned is not None and tuned.info.name.startswith(embedder.info.name + "+lora@")
    tuned_vector = tuned.embeddings.embed_query(probe)
    assert sum(a * b for a, b in zip(base_vector, tuned_vector)) < 0.9999  # the LoRA moved it
    assert embedder.embeddings.embed_query(probe) == pytest.approx(base_vector, abs=1e-6)  # the base did not move


# -- feedback: the chat's thumbs up and down as training data ---------------------------------
DOSE_CHUNK = {"n": 1, "title": "Cardivexin", "source": "data/demo/monographs/cardivexin.md", "score": 0.81,
              "text": "Cardivexin starts at 10 mg once daily, taken in the morning.", "page": None,
              "section": "Dosing", "cited": True}


@pytest.fixture(scope="module")
def feedback_history(tmp_path_factory: pytest.TempPathFactory):
    """A real chat history, filled through ChatMemory's API as the chat chain fills it."""
    from chatbot.chain import NO_ADAPTER
    from chatbot.memory import ChatMemory

    memory = ChatMemory(tmp_path_factory.mktemp("feedback") / "chat.sqlite3")
    made: dict[str, int] = {}

    def conversation(owner: str, *turns: tuple[str, str, str, int | None]) -> str:
        conversation_id = memory.create(owner)
        for question, answer, mode, feedback in turns:
            memory.append(owner, conversation_id, "user", question, mode=mode)
            sources = [DOSE_CHUNK] if mode in ("rag", "hybrid") and answer != NOT_COVERED else []
            message_id = memory.append(owner, conversation_id, "assistant", answer, mode=mode, sources=sources)
            if feedback is not None:
                assert memory.set_feedback(owner, message_id, feedback)
            made[answer] = message_id
        return conversation_id

    alice = "user:alice"  # opted in
    conversation(alice, ("What colour is the staff badge?", "Teal.", "base", 1),
                 ("And the visitor badge?", "Blue, always blue.", "base", -1))
    conversation(alice, ("What is the starting dose of Cardivexin?", "10 mg once daily [1].", "rag", 1),
                 ("Unrated follow-up?", "No thumbs here.", "rag", None))
    conversation(alice, ("Which extension reaches Security?", "Extension 2500.", "finetuned", 1),
                 ("Who approves Quorivelle after 72 hours?", "Anyone on the ward.", "finetuned", -1))
    conversation(alice, ("Is there a nursery on site?", NOT_COVERED, "rag", 1))  # the chain's own reply
    conversation(alice, ("Adapter?", NO_ADAPTER.format(mode="hybrid"), "hybrid", 1))  # likewise
    conversation("user:bob",  # opted in; the same first question as alice, disliked: a DPO pair
                 ("What colour is the staff badge?", "Red and gold.", "base", -1),
                 ("When does the pharmacy close on Sundays?", "At 16:00.", "base", 1))
    conversation("user:carol", ("Not opted in?", "Then not trained on.", "base", 1))
    conversation("user:dave", ("Excluded?", "Dave is a test account.", "base", -1))
    return memory, made


@pytest.fixture(scope="module")
def feedback_data(session_data_dir: Path, feedback_history, tmp_path_factory: pytest.TempPathFactory):
    """prepare --from-feedback through the command line, with one user excluded there."""
    from finetune.cli import main

    memory, made = feedback_history
    folder = tmp_path_factory.mktemp("feedback-data")
    settings_file = folder / "settings.yaml"
    settings_file.write_text(
        f"data_dir: {session_data_dir}\nchat: {{history_db: {memory.path}}}\n"
        "feedback: {train_on: opted_in, opted_in_owners: [alice, 'user:bob', dave]}\n")
    code = main(["prepare", "--from-feedback", "--out", str(folder / "out"), "--settings", str(settings_file),
                 "--exclude-user", "dave", "--val-share", "0.25", "--seed", "1", "--no-progress"])
    assert code == 0
    return folder / "out", settings_file, memory, made


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_from_feedback_keeps_opted_in_answers_in_the_chat_format(feedback_data) -> None:
    out, _, memory, made = feedback_data
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"excluded": 1, "not_generated": 2, "not_opted_in": 1}
    assert summary["rated_answers"] == {"all": 11, "liked": 7, "disliked": 4, "used": 7}
    assert set(summary["by_owner"]) == {"user:alice", "user:bob"}
    assert summary["by_owner"]["user:alice"] == {"liked": 3, "disliked": 2, "sft": 3, "kto": 5, "dpo": 1}
    assert summary["by_owner"]["user:bob"]["kto"] == 2 and summary["by_owner"]["user:bob"]["dpo"] == 1

    kto = {r["message_id"]: r for split in ("train", "validation") for r in read_rows(out / "kto" / f"{split}.jsonl")}
    assert set(kto) == {made[a] for a in ("Teal.", "Blue, always blue.", "10 mg once daily [1].", "Extension 2500.",
                                           "Anyone on the ward.", "Red and gold.", "At 16:00.")}
    assert kto[made["Red and gold."]]["label"] is False and kto[made["Teal."]]["label"] is True
    # Every prompt is the chain's: the mode's system prompt, its chunks, the earlier turns.
    followup = kto[made["Blue, always blue."]]
    assert followup["prompt"] == build_messages("And the visitor badge?", None,
                                                [("What colour is the staff badge?", "Teal.")])
    rag = kto[made["10 mg once daily [1]."]]
    assert rag["prompt"][0]["content"] == SYSTEM_WITH_DOCUMENTS and rag["sources"] == [DOSE_CHUNK["source"]]
    assert '<document n="1" title="Cardivexin, Dosing">' in rag["prompt"][-1]["content"]
    sft = [r for split in ("train", "validation") for r in read_rows(out / "sft" / f"{split}.jsonl")]
    assert sorted(r["completion"][0]["content"] for r in sft) == sorted(
        ["Teal.", "10 mg once daily [1].", "Extension 2500.", "At 16:00."])
    assert all(set(r) >= {"prompt", "completion", "id", "conversation_id"} and "label" not in r for r in sft)

    (pair,) = [r for split in ("train", "validation") for r in read_rows(out / "dpo" / f"{split}.jsonl")]
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("Teal.", "Red and gold.")
    assert pair["prompt"] == build_messages("What colour is the staff badge?", None)
    side = {split: {r["message_id"] for r in read_rows(out / "kto" / f"{split}.jsonl")} for split in ("train", "validation")}
    pair_side = [s for s in side if made["Teal."] in side[s]]
    assert made["Red and gold."] in side[pair_side[0]]  # a pair and its KTO halves share a split
    assert summary["records"]["validation"] >= 1 and summary["records"]["train"] >= 4
    for conversation, counts in summary["by_conversation"].items():
        assert counts["owner"] in ("user:alice", "user:bob") and counts["kto"] >= 1, conversation


def test_prepare_from_feedback_is_deterministic_and_obeys_the_policy(feedback_data, tmp_path: Path) -> None:
    from finetune.feedback import FeedbackOptions, prepare_feedback

    out, settings_file, memory, made = feedback_data
    settings = load_settings(settings_file)
    again = prepare_feedback(settings, tmp_path / "again", FeedbackOptions(val_share=0.25, seed=1, exclude_owners=["dave"]))
    for name in ("sft/train.jsonl", "kto/train.jsonl", "kto/validation.jsonl", "dpo/train.jsonl", "summary.json"):
        assert (again.out / name).read_bytes() == (out / name).read_bytes(), name
    everyone = settings.model_copy(update={"feedback": settings.feedback.model_copy(update={"train_on": "all"})})
    widened = prepare_feedback(everyone, tmp_path / "all", FeedbackOptions(exclude_owners=["dave"]))
    assert widened.summary["rated_answers"]["used"] == 8 and "not_opted_in" not in widened.summary["skipped"]
    assert set(widened.summary["by_owner"]) == {"user:alice", "user:bob", "user:carol"}
    nobody = everyone.model_copy(update={"feedback": everyone.feedback.model_copy(
        update={"excluded_owners": ["alice", "user:bob", "carol", "dave"]})})
    with pytest.raises(InputError, match="none of the 11 rated answers may be trained on .*excluded 11"):
        prepare_feedback(nobody, tmp_path / "none", FeedbackOptions())
    assert not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def kto_trained(session_data_dir: Path, feedback_data):
    out = feedback_data[0]
    settings = make_settings(session_data_dir, llm={"max_new_tokens": 16})
    config = TrainConfig(
        name="tiny-kto", objective="kto", train_files=[out / "kto" / "train.jsonl"],
        validation_files=[out / "kto" / "validation.jsonl"], lora={"rank": 4, "alpha": 8, "dropout": 0.0},
        learning_rate=5e-4, lr_scheduler="constant", warmup=0.0, batch_size=2, gradient_accumulation=1,
        eval_batch_size=2, group_by_length=False, max_length=512, max_steps=2, save_steps=2, logging_steps=1,
        check_examples=1,
    )
    watcher = WeightWatcher()
    return settings, train(config, settings, progress=False, callbacks=[watcher]), watcher


def test_kto_on_feedback_trains_an_adapter_the_chat_loads(kto_trained) -> None:
    settings, result, watcher = kto_trained
    lora_b = {n for n in watcher.lora if "lora_B" in n}
    assert lora_b and lora_b <= watcher.changed  # B starts at zero; KTO moved every one
    assert watcher.changed <= watcher.lora, sorted(watcher.changed - watcher.lora)[:5]
    metrics = json.loads((result.adapter_dir / "metrics.json").read_text())
    assert metrics["objective"] == "kto" and metrics["steps"] == 2 and len(metrics["train_loss_history"]) == 2
    assert {"rewards/chosen", "kl"} <= set(metrics["validation_rewards"])
    assert 0 < metrics["base_val_loss"] < 1 and 0 < metrics["adapter_val_loss"] < 1  # KTO's loss lies in (0, 1)
    validation = read_rows(Path(yaml.safe_load((result.adapter_dir / "train_config.yaml").read_text())
                                ["validation_files"][0]))
    liked = [r["completion"][0]["content"] for r in validation if r["label"]]
    (sample,) = metrics["generation_check"]["samples"]  # the adapter answered a held-out prompt...
    assert sample["output"] and sample["expected"] in (liked or [sample["expected"]])  # ...a liked one where any
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "data_fingerprint.json"} <= {
        f.name for f in result.adapter_dir.iterdir()}
    adapted = settings.model_copy(update={"llm": settings.llm.model_copy(update={"adapter": str(result.adapter_dir)})})
    chat = load_chat_model(adapted)
    assert chat.adapter_path == result.adapter_dir
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in chat.model.named_parameters())
