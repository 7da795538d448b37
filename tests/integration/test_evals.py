"""python -m evals end to end: the real packaged SmolLM2 and embedder, a local Qdrant of two monographs.

Three questions (a two-turn conversation and a closed-label one) and one malformed line, in two
modes; then an interrupted run resumed, which must give the records an uninterrupted run gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.prompts import build_messages
from evals.cli import main
from evals.runner import Evaluator
from tests.conftest import DEMO

QUESTIONS = [
    {"id": "c1", "question": "What is the starting dose of Cardivexin?",
     "answer": "Cardivexin starts at 10 mg once daily, taken in the morning with or without food.",
     "gold_doc": "monographs/cardivexin.md", "type": "factual", "conversation_id": "conv-1", "turn": 1},
    {"id": "c2", "question": "When can it be increased?",
     "answer": "Titrate to 20 mg once daily after 4 weeks if BP is above target (maximum 40 mg once daily).",
     "gold_doc": "monographs/cardivexin.md", "type": "followup", "conversation_id": "conv-1", "turn": 2},
    {"id": "y1", "question": "Does co-prescribing Glucarnil change the glucose effect of Cardivexin?",
     "answer": "Yes", "gold_doc": "monographs/cardivexin.md", "type": "factual"},
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, session_data_dir, embedder) -> dict[str, Path]:
    from core.settings import load_settings
    from core.store import open_store
    from ingest.service import build_indexer

    folder = tmp_path_factory.mktemp("evals")
    (folder / "settings.yaml").write_text("")
    settings = load_settings(folder / "settings.yaml", {
        "data_dir": str(session_data_dir), "qdrant": {"path": str(folder / "qdrant")}})
    client = open_store(settings)
    try:
        report = build_indexer(settings, client, embedder).run(
            [DEMO / "monographs" / "cardivexin.md", DEMO / "monographs" / "glucarnil.md"], progress=False)
        assert report.ok
    finally:
        client.close()  # Qdrant Edge allows one process: each evals run opens it itself
    qa = folder / "qa.jsonl"
    lines = [json.dumps(q) for q in QUESTIONS[:2]] + ['{"id": "broken", "question": '] + [json.dumps(QUESTIONS[2])]
    qa.write_text("\n".join(lines) + "\n")
    return {"folder": folder, "qa": qa, "data_dir": session_data_dir}


def _argv(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--qa", str(ws["qa"]), "--out", str(out), "--settings", str(ws["folder"] / "settings.yaml"),
        "--set", f"data_dir={ws['data_dir']}", "--set", f"qdrant.path={ws['folder'] / 'qdrant'}",
        "--set", "llm.max_new_tokens=32", "--no-progress", *extra,
    ]


def _records(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["mode"], r["id"]): r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def first_run(workspace, tmp_path_factory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("evals-out")
    return main(_argv(workspace, out, "--modes", "base,rag,hybrid")), out


def test_two_modes_three_questions_write_the_report_files(first_run, capsys) -> None:
    status, out = first_run
    assert status == 1  # the malformed line was skipped, and says so
    for name in ("report.md", "results.json", "metrics.png", "records.jsonl", "run.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| metric | n | base | rag |" in report  # hybrid: no adapter, skipped with a note
    assert "mode hybrid skipped: no adapter" in report and "qa.jsonl:3:" in report
    assert "label accuracy, likelihood" in report and "retrieval recall@10" in report

    records = _records(out)
    assert set(records) == {(m, q["id"]) for m in ("base", "rag") for q in QUESTIONS}
    for (mode, _), record in records.items():
        assert record["answer"], record
        assert record["scores"]["phantom_citations"] == []  # nothing cited that was not retrieved
        assert record["timings"]["total_s"] > 0
        assert (record["retrieved"] is None) == (mode == "base")
    rag_first = records[("rag", "c1")]
    assert rag_first["retrieved"][0]["source"].endswith("monographs/cardivexin.md")
    assert 1 <= len(rag_first["retrieved"]) <= 10 and len(rag_first["sources"]) <= 4  # k=10 beside the chain's k=4
    assert rag_first["scores"]["recall@1"] is True and rag_first["scores"]["reciprocal_rank"] == 1.0
    # the follow-up was asked in the same conversation: its retrieval query carries the first turn
    assert records[("rag", "c2")]["query"] == f"{QUESTIONS[0]['question']} {QUESTIONS[1]['question']}"
    assert records[("rag", "c2")]["chat_conversation_id"] == rag_first["chat_conversation_id"]
    closed = records[("rag", "y1")]
    assert set(closed["label_logprobs"]) == {"yes", "no", "maybe"}
    assert closed["scores"]["label_likelihood"] in {"yes", "no", "maybe"}
    assert "token_f1" not in closed["scores"]  # a bare label has no free-form reference

    results = json.loads((out / "results.json").read_text())
    assert len(results["records"]) == 6 and set(results["summary"]) == {"base", "rag"}
    assert results["config"]["retrieval"]["recall_k"] == 10 and results["config"]["llm"]["temperature"] == 0.0
    assert results["config"]["llm"]["backend"] == "llamacpp" == results["config"]["generation"]["backend"]
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_run_resumes_where_it_stopped(workspace, first_run, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    real_evaluate = Evaluator.evaluate
    calls: list[tuple[str, str]] = []

    def interrupted_at_the_follow_up(self, mode, question):
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the rag follow-up is being answered
        calls.append((mode, question.id))
        return real_evaluate(self, mode, question)

    monkeypatch.setattr(Evaluator, "evaluate", interrupted_at_the_follow_up)
    assert main(_argv(workspace, out, "--modes", "rag,base")) == 130
    assert list(_records(out)) == [("rag", "c1")]
    with (out / "records.jsonl").open("a") as handle:
        handle.write('{"mode": "rag", "id": "c2", "ans')  # and a line cut short, as by kill -9

    assert main(_argv(workspace, out, "--modes", "rag,base")) == 2  # will not mix runs without --resume
    assert main(_argv(workspace, out, "--modes", "rag,base", "--resume", "--set", "retrieval.k=2")) == 2
    capsys.readouterr()
    # records of another backend are other answers, however close: no mixing them in one run
    assert main(_argv(workspace, out, "--modes", "rag,base", "--resume", "--set", "llm.backend=transformers")) == 2
    assert "used other settings (llm)" in capsys.readouterr().err

    def counted(self, mode, question):
        calls.append((mode, question.id))
        return real_evaluate(self, mode, question)

    monkeypatch.setattr(Evaluator, "evaluate", counted)
    assert main(_argv(workspace, out, "--modes", "rag,base", "--resume")) == 1
    assert calls[1:] == [("rag", "c2"), ("rag", "y1"), ("base", "c1"), ("base", "c2"), ("base", "y1")]

    resumed, uninterrupted = _records(out), _records(first_run[1])
    assert set(resumed) == set(uninterrupted)
    # the follow-up continued its conversation from the records, and everything is deterministic
    assert resumed[("rag", "c2")]["query"] == uninterrupted[("rag", "c2")]["query"]
    for key, record in uninterrupted.items():
        for field in ("answer", "retrieved", "cited", "label_logprobs", "scores"):
            assert resumed[key].get(field) == record.get(field), (key, field)


def test_label_likelihood_matches_a_plain_forward_pass(settings_factory) -> None:
    """The transformers backend's cached scoring against a full forward pass (the llamacpp backend is
    compared with this one in test_generation.py)."""
    import torch

    from core.generation.transformers import TransformersBackend, forward_label_logprobs

    backend = TransformersBackend(settings_factory(llm={"backend": "transformers"}))
    chat_model = backend.weights(False)
    messages = build_messages("Is aspirin an antiplatelet drug? Answer yes, no or maybe.", None)
    labels = {"yes": "Yes", "no": "No", "maybe": "Maybe, it depends"}  # the last one is several tokens
    cached = backend.label_logprobs(messages, adapted=False, label_texts=labels)
    context = backend.prompt_ids(messages)
    tokenizer = chat_model.tokenizer
    for label, text in labels.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = chat_model.model(input_ids=torch.tensor([context + ids])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        expected = sum(float(logprobs[len(context) - 1 + i, token]) for i, token in enumerate(ids))
        assert cached[label] == pytest.approx(expected, abs=1e-3), label
    assert len(tokenizer("Maybe, it depends", add_special_tokens=False)["input_ids"]) > 1

    # through a PEFT LoRA wrapper too (hybrid/finetuned); a fresh LoRA (B = 0) changes nothing yet
    from peft import LoraConfig, get_peft_model

    adapted = type(chat_model)(get_peft_model(chat_model.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
                               tokenizer, chat_model.base_name)
    assert forward_label_logprobs(adapted, context, labels) == pytest.approx(cached, abs=1e-4)
