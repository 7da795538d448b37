"""Fine-tuning without models: splits, RAFT assembly, configs, output folders (Q/A records: test_qa.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from core.prompts import NOT_COVERED, SYSTEM_WITH_DOCUMENTS, SYSTEM_WITHOUT_DOCUMENTS, ContextChunk, build_messages
from core.settings import SettingsError
from finetune.abbreviations import BUILTIN, AbbreviationSwapper, clean_expansion, load_glossaries
from finetune.cli import make_parser
from finetune.config import load_train_config, split_overrides
from finetune.data import (
    Passage, PrepareOptions, build_raft_examples, choose_no_gold, retrieval_queries, sft_example,
    split_records,
)
from finetune.files import InputError, OutputExistsError, staged_dir
from core.qa import QARecord
from finetune.train import read_examples
from tests.conftest import DEMO, PUBMEDQA, REPO


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def qa(record_id: str, **fields) -> str:
    return json.dumps({"id": record_id, "question": f"Question {record_id}?", "answer": f"Answer {record_id}.",
                       "gold_doc": f"docs/{record_id}.md", **fields})


# -- splits and RAFT assembly -------------------------------------------------------------------
def records(count: int, **fields) -> list[QARecord]:
    made = []
    for i in range(count):
        record = QARecord.model_validate(json.loads(qa(f"r{i:03d}", **fields)))
        record.where = f"qa.jsonl:{i + 1}"
        made.append(record)
    return made


def test_split_is_seeded_and_keeps_conversations_together() -> None:
    items = records(40)
    for i, record in enumerate(items):
        record.conversation_id, record.turn = f"conv-{i // 2}", 1 + i % 2
    train, validation = split_records(items, 0.25, seed=7)
    assert (train, validation) == split_records(items, 0.25, seed=7)
    assert split_records(items, 0.25, seed=8) != (train, validation)
    assert len(validation) == 10 and len(train) == 30
    assert not {r.conversation_id for r in train} & {r.conversation_id for r in validation}


class FakePassages:
    """The finetune.data.Passages interface over a made-up index: doc 'docs/rNNN.md' has one chunk."""

    collection = "fake"

    def gold_document(self, record: QARecord) -> str:
        return f"doc:{record.gold_doc}"

    def embed(self, questions):
        return [[float(len(q))] for q in questions]

    def best_in_document(self, query, vector, doc_id, page):
        return self.top_in_document(query, vector, doc_id, page, 1)[0]

    def top_in_document(self, query, vector, doc_id, page, limit):
        # The document's chunks, best first: "gold text", then "more of <doc> 1", "more of <doc> 2"...
        texts = [f"gold text of {doc_id}"] + [f"more of {doc_id} {i}" for i in range(1, limit)]
        return [Passage(doc_id, ContextChunk(text, f"Title {doc_id}", doc_id)) for text in texts]

    def top_score(self, query, vector):
        return vector[0]  # the longest query scores highest

    def top_outside(self, query, vector, exclude_doc_id, limit):
        return [Passage(f"other{i}", ContextChunk(f"distractor {i}", f"Other {i}", f"other{i}.md"))
                for i in range(limit)]


def test_raft_shares_citations_and_prompts_follow_the_config() -> None:
    answerable = records(40)
    unanswerable = records(5, type="unanswerable", gold_doc=None)
    for i, record in enumerate(unanswerable):
        record.id = f"u{i}"
    items = answerable + unanswerable
    options = PrepareOptions(no_gold_share=0.25, seed=3)
    examples = build_raft_examples(items, items, FakePassages(), options, "train", 3, 2)

    cases = Counter(e["case"] for e in examples)
    assert cases == {"gold": 30, "no_gold": 10, "unanswerable": 5}  # exactly round(0.25 * 40) lose the gold
    for example, record in zip(examples, items):
        user = example["prompt"][-1]["content"]
        assert example["prompt"][0]["content"] == SYSTEM_WITH_DOCUMENTS
        assert user.count("<document n=") == 4  # k + 1 chunks whether or not the gold one is there
        target = example["completion"][0]["content"]
        if example["case"] == "gold":
            n = example["gold"]
            assert target == f"{record.answer} [{n}]"
            assert example["sources"][n - 1] == f"doc:{record.gold_doc}"
            assert f'<document n="{n}" title="Title doc:{record.gold_doc}">\ngold text' in user
        else:
            assert target == NOT_COVERED and example["gold"] is None
            assert f"doc:{record.gold_doc}" not in example["sources"]
    positions = Counter(e["gold"] for e in examples if e["gold"])
    assert set(positions) == {1, 2, 3, 4}  # shuffled, not always first

    again = build_raft_examples(items, items, FakePassages(), options, "train", 3, 2)
    assert again == examples
    assert choose_no_gold(items, 0.25, 4, "train") != choose_no_gold(items, 0.25, 3, "train")


def test_gold_chunks_show_more_of_the_gold_document_and_cite_its_best_chunk() -> None:
    items = records(12)
    options = PrepareOptions(gold_chunks=3, no_gold_share=0.0, quotes=False)
    examples = build_raft_examples(items, items, FakePassages(), options, "train", 1, 2)
    for example, record in zip(examples, items):
        user = example["prompt"][-1]["content"]
        assert user.count("<document n=") == 4  # 3 of the gold document + 1 distractor
        assert example["sources"].count(f"doc:{record.gold_doc}") == 3
        n = example["gold"]  # the cited one is the best-ranked gold chunk, wherever the shuffle put it
        assert f'<document n="{n}" title="Title doc:{record.gold_doc}">\ngold text' in user
        assert example["completion"][0]["content"] == f"{record.answer} [{n}]"
    assert len({e["gold"] for e in examples}) > 1


def test_followups_carry_history_and_search_with_the_previous_question() -> None:
    opener, followup = records(2)
    opener.conversation_id = followup.conversation_id = "c1"
    opener.turn, followup.turn, followup.type = 1, 2, "followup"
    examples = build_raft_examples([followup], [opener, followup], FakePassages(), PrepareOptions(), "train", 2, 2)
    prompt = examples[0]["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[1]["content"] == opener.question and prompt[2]["content"] == opener.answer
    history = [(opener.question, opener.answer)]
    assert retrieval_queries([followup], [history], FakePassages(), 2) == [f"{opener.question} {followup.question}"]
    sft = sft_example(followup, [(opener.question, opener.answer)])
    assert sft["prompt"] == build_messages(followup.question, None, [(opener.question, opener.answer)])
    assert sft["prompt"][0]["content"] == SYSTEM_WITHOUT_DOCUMENTS


def test_a_stored_chunk_reads_the_same_in_training_data_and_in_the_chat() -> None:
    from core.retrieval import Source

    metadata = {"title": "Renal handbook", "source": "data/demo/h.pdf", "page": 2, "section": "", "doc_id": "d"}
    chunk = ContextChunk.from_metadata("Text.", metadata)
    assert chunk == ContextChunk("Text.", "Renal handbook", "data/demo/h.pdf", 2, None)  # "" section: none
    assert chunk.label() == "Renal handbook, page 2"
    shown = Source(n=1, score=0.5, **{k: getattr(chunk, k) for k in ("text", "title", "source", "page", "section")})
    assert (shown.title, shown.page, shown.section) == ("Renal handbook", 2, None)


# -- training config and data -------------------------------------------------------------------
def test_demo_config_is_valid_and_within_the_demo_limits() -> None:
    config = load_train_config(REPO / "finetune" / "configs" / "demo.yaml")
    assert config.name == "demo" and config.lora.rank <= 16
    # rank x (in + out) per adapted projection, 30 layers, fp32: the adapter stays under 20 MB.
    shapes = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
              "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    parameters = 30 * sum(config.lora.rank * sum(shapes[m]) for m in config.lora.target_modules)
    assert parameters * 4 / 2**20 < 20


def test_pubmedqa_config_keeps_the_committed_adapter_under_10_mb() -> None:
    config = load_train_config(REPO / "finetune" / "configs" / "pubmedqa.yaml")
    assert config.name == "pubmedqa" and config.threads == 1 and config.max_steps
    shapes = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
              "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    parameters = 30 * sum(config.lora.rank * sum(shapes[m]) for m in config.lora.target_modules)
    tokenizer_mb = 3.4  # tokenizer.json, saved beside the adapter
    assert parameters * (4 + 2) / 2**20 + tokenizer_mb < 10  # fp32 safetensors + f16 GGUF
    committed = REPO / "data" / "adapters" / "pubmedqa"
    if committed.is_dir():
        assert sum(f.stat().st_size for f in committed.iterdir()) / 2**20 < 10


def test_set_overrides_go_to_the_config_or_the_settings(tmp_path: Path) -> None:
    from core.settings import parse_overrides

    config_part, settings_part = split_overrides(parse_overrides(
        ["lora.rank=4", "epochs=1", "data_dir=/tmp/run", "llm.max_new_tokens=32"]))
    assert config_part == {"lora": {"rank": 4}, "epochs": 1}
    assert settings_part == {"data_dir": "/tmp/run", "llm": {"max_new_tokens": 32}}
    with pytest.raises(SettingsError, match="lora_rank"):
        split_overrides(parse_overrides(["lora_rank=4"]))

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("name: t\ntrain_files: a.jsonl\nvalidation_files: [b.jsonl]\nlora: {rank: 8}\n")
    config = load_train_config(yaml_file, config_part)
    assert config.lora.rank == 4 and config.lora.alpha == 16 and config.epochs == 1
    assert config.train_files == [Path("a.jsonl")]
    yaml_file.write_text("name: t\ntrain_files: a.jsonl\nvalidation_files: b.jsonl\nlora: {rnak: 8}\n")
    with pytest.raises(SettingsError) as caught:
        load_train_config(yaml_file)
    assert str(yaml_file) in str(caught.value) and "lora.rnak" in str(caught.value)
    yaml_file.write_text("name: t\ntrain_files: a.jsonl\nvalidation_files: a.jsonl\n")
    with pytest.raises(SettingsError, match="both a training and a validation file"):
        load_train_config(yaml_file)


def test_prepared_files_are_checked_line_by_line(tmp_path: Path) -> None:
    good = {"prompt": build_messages("Q?", None), "completion": [{"role": "assistant", "content": "A."}]}
    path = write_lines(tmp_path / "train.jsonl", [
        json.dumps(good),
        json.dumps({**good, "completion": [{"role": "assistant", "content": ""}]}),
        json.dumps({"prompt": good["prompt"]}),
        json.dumps({**good, "prompt": good["prompt"][:1]}),
    ])
    with pytest.raises(InputError) as caught:
        read_examples(path)
    message = str(caught.value)
    assert f"{path}:2: empty assistant message" in message
    assert f"{path}:3: expected" in message
    assert f"{path}:4: the prompt must end with a user message" in message
    write_lines(path, [json.dumps(good), '{"prompt": ['])
    with pytest.raises(InputError, match=rf"{path}:2: not valid JSON"):
        read_examples(path)


def test_preference_files_and_configs_are_checked_for_their_objective(tmp_path: Path) -> None:
    prompt = build_messages("Q?", None)
    answer = [{"role": "assistant", "content": "A."}]
    kto = write_lines(tmp_path / "kto.jsonl", [
        json.dumps({"prompt": prompt, "completion": answer, "label": False, "id": "fb-1"}),
        json.dumps({"prompt": prompt, "completion": answer, "label": "yes"}),
        json.dumps({"prompt": prompt, "completion": answer}),
    ])
    with pytest.raises(InputError) as caught:
        read_examples(kto, "kto")
    assert f"{kto}:2: 'label' must be true" in str(caught.value) and f"{kto}:3:" in str(caught.value)
    assert f"{kto}:1:" not in str(caught.value)
    dpo = write_lines(tmp_path / "dpo.jsonl", [
        json.dumps({"prompt": prompt, "chosen": answer, "rejected": [{"role": "assistant", "content": "B."}]}),
        json.dumps({"prompt": prompt, "chosen": answer}),
        json.dumps({"prompt": prompt, "chosen": answer, "rejected": answer + answer}),
    ])
    with pytest.raises(InputError) as caught:
        read_examples(dpo, "dpo")
    assert f"{dpo}:2: expected" in str(caught.value) and "'rejected': [assistant message]" in str(caught.value)
    assert f"{dpo}:3: the rejected must be exactly one assistant message" in str(caught.value)
    (pair,) = read_examples(write_lines(tmp_path / "one.jsonl", [json.dumps(json.loads(dpo.read_text().splitlines()[0]))]), "dpo")
    assert pair.as_row("dpo") == {"prompt": prompt, "chosen": answer, "rejected": [{"role": "assistant", "content": "B."}]}

    for config in ("feedback.yaml", "feedback-dpo.yaml"):
        loaded = load_train_config(REPO / "finetune" / "configs" / config)
        assert loaded.objective in ("kto", "dpo") and f"/{loaded.objective}/" in str(loaded.train_files[0])
    feedback = REPO / "finetune" / "configs" / "feedback.yaml"
    with pytest.raises(SettingsError, match="batch_size 2 or more"):
        load_train_config(feedback, {"batch_size": 1})
    with pytest.raises(SettingsError, match="group_by_length: false"):
        load_train_config(feedback, {"group_by_length": True})


# -- output folders -----------------------------------------------------------------------------
def test_outputs_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(target) as staging:
            (staging / "half.jsonl").write_text("{}\n")
            raise RuntimeError("bad record")
    assert not target.exists() and list(tmp_path.iterdir()) == []

    with staged_dir(target) as staging:
        (staging / "v1").write_text("1")
    with pytest.raises(OutputExistsError, match="--force"):
        with staged_dir(target):
            pass
    with staged_dir(target, force=True) as staging:
        (staging / "v2").write_text("2")
    assert [p.name for p in target.iterdir()] == ["v2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- abbreviations ------------------------------------------------------------------------------
def test_demo_glossaries_give_both_phrasings() -> None:
    table = load_glossaries([DEMO / "glossary"])
    assert table["MI"] == "myocardial infarction" and table["BID"] == "twice daily"
    assert table["BP"] == "blood pressure" and table["ACS"] == "acute coronary syndrome"
    swapper = AbbreviationSwapper(table)
    assert swapper.variants("Aspirin after an MI?") == ["Aspirin after an myocardial infarction?"]
    assert swapper.variants("Door-to-balloon time in ST-elevation myocardial infarction?") == [
        "Door-to-balloon time in STEMI?"]
    assert swapper.variants("Minimum dose?") == []  # no "MI" inside words


def test_glossary_parsing_and_fallback(tmp_path: Path) -> None:
    assert clean_expansion("as required (pro re nata)") == "as required"
    assert clean_expansion("blood pressure, recorded as systolic/diastolic.") == "blood pressure"
    assert clean_expansion("airway, breathing, circulation: the assessment") == "airway, breathing, circulation"
    bad = write_lines(tmp_path / "g.csv", ["abbr,meaning", "MI,myocardial infarction"])
    with pytest.raises(InputError, match="abbreviation,expansion"):
        load_glossaries([bad])
    with pytest.raises(InputError, match="no such glossary"):
        load_glossaries([tmp_path / "absent"])
    assert AbbreviationSwapper(BUILTIN).expand("HTN and T2DM") == "hypertension and type 2 diabetes"


# -- the command line ---------------------------------------------------------------------------
def test_help_shows_copy_paste_examples(capsys: pytest.CaptureFixture[str]) -> None:
    parser = make_parser()
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for command in ("python -m finetune prepare --qa", "python -m finetune train --config finetune/configs/demo.yaml",
                    "python -m finetune prepare --from-feedback", "python -m finetune train --config finetune/configs/feedback.yaml",
                    "python -m finetune merge demo", "python -m finetune embeddings --qa"):
        assert command in text
    for sub in ("prepare", "train", "merge", "embeddings"):
        with pytest.raises(SystemExit):
            parser.parse_args([sub, "--help"])
        assert "Examples:" in capsys.readouterr().out


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.cli import main

    bad = write_lines(tmp_path / "qa.jsonl", ['{"id": 1, "question": "x"'])
    code = main(["prepare", "--qa", str(bad), "--out", str(tmp_path / "out"), "--set", f"data_dir={tmp_path}"])
    assert code == 2 and f"{bad}:1: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    out = ["--out", str(tmp_path / "out"), "--set", f"data_dir={tmp_path}"]
    assert main(["prepare", "--from-feedback", "--val-qa", str(bad), *out]) == 2
    assert "--val-qa: not used with --from-feedback" in capsys.readouterr().err
    assert main(["prepare", "--qa", str(bad), "--exclude-user", "alice", *out]) == 2
    assert "--exclude-user applies to --from-feedback only" in capsys.readouterr().err
    assert main(["prepare", "--from-feedback", *out]) == 2  # no chat history in this data_dir
    assert f"{tmp_path / 'chat.sqlite3'}: no chat history" in capsys.readouterr().err
    assert main(["prepare", "--from-feedback", *out, "--set", "feedback.train_on=none"]) == 2
    assert "feedback.train_on is 'none'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_training_precision_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch) -> None:
    from core import hardware

    assert hardware.use_bf16("bf16") is True and hardware.use_bf16("fp32") is False
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0] if Path("/proc/cpuinfo").is_file() else ""
    assert hardware.use_bf16("auto") == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    hardware.cpu_has_bf16.cache_clear()
    monkeypatch.setattr(hardware, "Path", lambda _: Path("/nonexistent/cpuinfo"))
    assert hardware.use_bf16("auto") is False  # unreadable: fp32, never emulated bf16
    hardware.cpu_has_bf16.cache_clear()
