"""evals without a model: question sets (both formats, malformed lines), the record log, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.cli import _prepare_out, make_parser, resume_mismatch
from evals.metrics import score_record
from evals.questions import load_questions, read_ids, select
from evals.records import RecordLog
from evals.report import markdown_table, summaries, write_outputs
from tests.conftest import DEMO, PUBMEDQA


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_demo_records_conversations_in_turn_order_and_malformed_lines(tmp_path: Path) -> None:
    qa = _write(tmp_path / "qa.jsonl", [
        {"id": "a", "question": "What is HTN?", "answer": "Hypertension.", "gold_doc": "glossary/x.md",
         "type": "abbreviation"},
        {"id": "c2", "question": "And then?", "answer": "B.", "gold_doc": "m.md", "type": "followup",
         "conversation_id": "conv", "turn": 2},
        "{not json",
        {"id": "b", "question": "  ", "answer": "x"},
        {"id": "c1", "question": "Start?", "answer": "A.", "gold_doc": "m.md", "type": "factual",
         "conversation_id": "conv", "turn": 1},
        "",
        {"id": "a", "question": "Duplicate?", "answer": "x"},
        {"id": "f", "question": "Orphan follow-up?", "answer": "x", "type": "followup"},
        {"id": "u", "question": "Nursery?", "answer": "The documents do not cover this.", "gold_doc": None,
         "type": "unanswerable"},
        {"id": "y", "question": "Is it safe?", "answer": "Yes", "gold_doc": "m.md", "type": "factual"},
        ["a", "list"],
        {"id": "p", "question": "Page?", "answer": "x", "gold_doc": "h.pdf", "gold_page": 0},
    ])
    loaded = load_questions(qa)
    assert [q.id for q in loaded.questions] == ["a", "c1", "c2", "u", "y"]  # c1 moved before c2
    lines = [p.split(":")[1] for p in loaded.problems]
    assert lines == ["3", "4", "7", "8", "11", "12"], loaded.problems
    assert "not valid JSON" in loaded.problems[0] and "duplicate id 'a' (first on line 1)" in loaded.problems[2]
    assert "followup needs 'conversation_id'" in loaded.problems[3] and "gold_page" in loaded.problems[5]
    unanswerable = loaded.questions[3]
    assert unanswerable.unanswerable and unanswerable.reference is None and unanswerable.gold is None
    assert (loaded.questions[4].label, loaded.questions[4].reference) == ("yes", None)  # a bare "Yes" is a label
    assert loaded.questions[0].label is None and loaded.questions[0].reference == "Hypertension."


def test_pubmedqa_records_have_a_label_a_long_answer_and_a_record_id_as_gold(tmp_path: Path) -> None:
    qa = _write(tmp_path / "dev.jsonl", [
        {"id": "10340286", "question": "Is CRP useful?", "answer": "maybe", "long_answer": "It may be."},
        {"id": 123, "question": "Does X work?", "answer": "probably", "long_answer": "Yes."},
    ])
    loaded = load_questions(qa)
    (q,) = loaded.questions
    assert (q.label, q.reference, q.gold, q.unanswerable) == ("maybe", "It may be.", "#10340286", False)
    assert "must be yes, no or maybe" in loaded.problems[0]


@pytest.mark.skipif(not (PUBMEDQA / "dev.jsonl").is_file(), reason="PubMedQA is not in ../shared")
def test_the_shipped_question_sets_load_without_problems() -> None:
    demo = load_questions(DEMO / "qa" / "test.jsonl")
    assert not demo.problems and len(demo.questions) == 95
    pubmedqa = load_questions(PUBMEDQA / "dev.jsonl")
    assert not pubmedqa.problems and len(pubmedqa.questions) == 500
    assert {q.label for q in pubmedqa.questions} == {"yes", "no", "maybe"}


def test_id_files_select_and_limit(tmp_path: Path) -> None:
    qa = _write(tmp_path / "qa.jsonl", [{"id": i, "question": f"q{i}?", "answer": "x"} for i in "abcd"])
    questions = load_questions(qa).questions
    ids_jsonl = _write(tmp_path / "train.jsonl", [{"id": "a", "prompt": []}, {"id": "c"}])
    ids_text = _write(tmp_path / "ids.txt", ["b", "", "d"])
    assert read_ids(ids_jsonl) == {"a", "c"} and read_ids(ids_text) == {"b", "d"}
    assert [q.id for q in select(questions, exclude=read_ids(ids_jsonl))] == ["b", "d"]
    assert [q.id for q in select(questions, only=read_ids(ids_text), limit=1)] == ["b"]
    # prepare writes UTF-8 as it is: a PubMedQA abstract's U+2029 inside a string is not a line end
    prepared = tmp_path / "prepared.jsonl"
    prepared.write_text('{"id": "a", "prompt": "one\u2029two\u2028three\x85four"}\n{"id": "b"}\n', encoding="utf-8")
    assert read_ids(prepared) == {"a", "b"}


def test_record_log_appends_and_drops_a_line_cut_short_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    log = RecordLog(path).load()
    log.append({"mode": "rag", "id": "a"})
    log.append({"mode": "base", "id": "a"})
    with path.open("a") as handle:
        handle.write('{"mode": "rag", "id": "b", "answ')  # killed mid-write
    reopened = RecordLog(path).load()
    assert reopened.done() == {("rag", "a"), ("base", "a")} and reopened.dropped == 1
    reopened.append({"mode": "rag", "id": "b"})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "a", "b"]


def test_output_folder_refuses_to_mix_runs_unless_told(tmp_path: Path) -> None:
    (tmp_path / "records.jsonl").write_text('{"mode": "rag", "id": "a"}\n')
    assert "--resume" in (_prepare_out(tmp_path, resume=False, force=False) or "")
    assert _prepare_out(tmp_path, resume=True, force=False) is None and (tmp_path / "records.jsonl").exists()
    assert _prepare_out(tmp_path, resume=False, force=True) is None and not (tmp_path / "records.jsonl").exists()


def test_resume_refuses_other_settings_but_not_other_modes() -> None:
    config = {"question_set": {"sha256": "x"}, "seed": 0, "llm": {"model": "m"}, "adapter": None,
              "embedder": "e", "collection": {"name": "c", "points": 3}, "retrieval": {"k": 4},
              "condense": "concat", "attribute_citations": True, "modes": ["rag"], "limit": 3}
    assert resume_mismatch(config, config | {"modes": ["base", "rag"], "limit": None}) == []
    changed = config | {"adapter": {"fingerprint": "f"}, "collection": {"name": "c", "points": 9}}
    assert resume_mismatch(config, changed) == []  # only rag was recorded: the adapter played no part
    adapted = config | {"recorded_modes": ["rag", "hybrid"]}
    assert resume_mismatch(adapted, changed) == ["adapter"]  # the point count may grow; the name may not
    assert resume_mismatch(adapted, changed | {"retrieval": {"k": 10}}) == ["adapter", "retrieval"]
    # Only modes that read no chunk were recorded: retrieval changed since touched none of them.
    closed_book = config | {"recorded_modes": ["base", "finetuned"]}
    assert resume_mismatch(closed_book, changed | {"retrieval": {"k": 10}, "embedder": "e2"}) == ["adapter"]


def test_help_shows_copy_paste_examples() -> None:
    text = make_parser().format_help()
    assert "python -m evals --qa data/demo/qa/test.jsonl --modes base,rag --out" in text
    assert "--resume" in text and "--collection pubmedqa" in text


def test_report_table_and_files_from_records(tmp_path: Path) -> None:
    records = []
    for mode, answer in (("base", "Ten mg."), ("rag", "10 mg [1].")):
        record = {"mode": mode, "id": "q1", "question": "Dose?", "reference": "10 mg.", "label": None,
                  "gold": "m.md", "unanswerable": False, "answer": answer, "cited": [1] if mode == "rag" else [],
                  "retrieved": [{"source": "d/m.md"}] if mode == "rag" else None,
                  "sources": [{"n": 1, "source": "d/m.md", "cited": True}] if mode == "rag" else [],
                  "timings": {"total_s": 1.0}}
        record["scores"] = score_record(record)
        records.append(record)
    table = markdown_table(summaries(records, ["base", "rag"]))
    assert table.splitlines()[0] == "| metric | n | base | rag |"
    assert "| retrieval recall@1 | 1 | – | 100.0% |" in table
    assert "| answer token F1 | 1 | 50.0% | 100.0% |" in table  # "ten mg" vs "10 mg": 1 of 2 tokens
    assert "label accuracy" not in table  # no closed-label question: no such row
    config = {"command": "python -m evals --qa qa.jsonl", "started": "now", "questions": 1,
              "question_set": {"path": "qa.jsonl", "sha256": "0" * 64, "types": {"factual": 1}},
              "llm": {"model": "M", "setting": "packaged", "temperature": 0.0, "max_new_tokens": 8,
                      "repetition_penalty": 1.1, "context_window": 2048},
              "adapter": None, "embedder": "E", "collection": {"name": "c", "points": 1},
              "retrieval": {"k": 4, "recall_k": 10, "search": "similarity", "score_threshold": 0.25},
              "condense": "concat", "seed": 0, "modes": ["base", "rag"]}
    written = write_outputs(tmp_path, config, records, ["base", "rag"], notes=["mode hybrid skipped"])
    report = written["report"].read_text()
    assert "| metric | n | base | rag |" in report and "adapter: none" in report and "mode hybrid skipped" in report
    results = json.loads(written["results"].read_text())
    assert results["records"][1]["answer"] == "10 mg [1]." and results["summary"]["rag"]["recall@1"] == 1.0
    assert written["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_rewrites_the_report_from_records_without_a_model(tmp_path: Path) -> None:
    from evals.cli import main

    qa = _write(tmp_path / "qa.jsonl", [{"id": "q1", "question": "Dose?", "answer": "10 mg.", "gold_doc": "m.md"}])
    out = tmp_path / "out"
    out.mkdir()
    config = {"command": "python -m evals --qa qa.jsonl", "started": "then", "questions": 1, "seed": 0,
              "question_set": {"path": str(qa), "sha256": "0" * 64, "types": {}},
              "llm": {"model": "M", "setting": "packaged", "temperature": 0.0, "max_new_tokens": 8,
                      "repetition_penalty": 1.1, "context_window": 2048},
              "adapter": None, "embedder": "E", "collection": {"name": "c", "points": 1},
              "retrieval": {"k": 4, "recall_k": 10, "search": "similarity", "score_threshold": 0.25},
              "condense": "concat", "modes": ["rag"]}
    (out / "run.json").write_text(json.dumps(config))
    # recorded with an old definition: the stored score is wrong on purpose, the report re-scores
    _write(out / "records.jsonl", [{"mode": "rag", "id": "q1", "question": "Dose?", "reference": "10 mg.",
                                    "gold": "m.md", "answer": "10 mg.", "retrieved": [{"source": "d/m.md"}],
                                    "sources": [], "cited": [], "timings": {}, "scores": {"token_f1": 0.0}}])
    settings = tmp_path / "settings.yaml"
    settings.write_text("")
    argv = ["--qa", str(qa), "--out", str(out), "--modes", "base,rag", "--settings", str(settings), "--report-only"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "| metric | n | rag |" in report and "| answer token F1 | 1 | 100.0% |" in report
    assert main(argv[:-1] + ["--modes", "base", "--report-only"]) == 2  # no records of that mode
