"""The one Q/A record model (core.qa): hand-made good and bad records, read by fine-tuning's strict
loader and by evals' lenient one, which must agree on every record and every file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.jsonl import InputError
from core.prompts import NOT_COVERED
from core.qa import QARecord, check_disjoint, load_qa, read_qa
from evals.questions import load_questions
from finetune.data import sft_example
from tests.conftest import DEMO, PUBMEDQA


def write_lines(path: Path, lines: list[object], bom: bool = False) -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def qa(record_id: str, **fields) -> dict:
    return {"id": record_id, "question": f"Question {record_id}?", "answer": f"Answer {record_id}.",
            "gold_doc": f"docs/{record_id}.md", **fields}


# One line per rule; (line, words the reason must contain). Good lines carry None.
MIXED = [
    (qa("a"), None),
    ('{"id": "b", "question": "Broken?", ', "not valid JSON"),
    ({"id": "c", "answer": "No question."}, "field 'question'"),
    ({"id": "d", "question": "Empty?", "answer": "  ", "gold_doc": "x.md"}, "'answer' is empty"),
    (qa("a"), "duplicate id 'a' (first on line 1)"),
    ({"id": "f", "question": "Typo?", "answer": "x", "type": "factoid"}, "field 'type'"),
    ("[1, 2]", "JSON object"),
    ({"id": 7, "question": "Numeric id?", "answer": "Fine.", "type": "factual"}, None),
    ({"id": True, "question": "Boolean id?", "answer": "x"}, "field 'id'"),
    (qa("u1", type="unanswerable", gold_doc=None, answer=NOT_COVERED), None),
    (qa("u2", type="unanswerable"), "unanswerable record names no gold_doc"),
    (qa("u3", gold_doc=None, answer=""), None),  # untyped, gold_doc null: unanswerable
    (qa("n1", type="factual", gold_doc=None), "gold_doc is null"),
    (qa("c1", conversation_id="conv", turn=1), None),
    (qa("c2", conversation_id="conv", turn=2, type="followup"), None),
    (qa("c3", conversation_id="conv", turn=2), "conversation 'conv' has turn 2 twice"),
    (qa("o1", type="followup"), "followup needs 'conversation_id'"),
    (qa("o2", conversation_id="other"), "needs both 'conversation_id' and 'turn'"),
    (qa("o3", conversation_id="other", turn="2"), "field 'turn'"),
    (qa("p1", gold_page=0), "field 'gold_page'"),
    (qa("up1", type="update", gold_doc="updates/policy-2026.md", stale_doc="policies/policy.md"), None),
    (qa("up2", type="update", gold_doc=None), "gold_doc is null"),
    (qa("up3", stale_doc="docs/up3.md"), "'stale_doc' (the older document) needs a different 'gold_doc'"),
    ({"id": "pm1", "question": "Is CRP useful?", "answer": "maybe", "long_answer": "It may be."}, None),
    ({"id": "pm2", "question": "Does X work?", "answer": "probably", "long_answer": "Yes."}, "yes, no or maybe"),
]


def test_both_readers_agree_on_every_good_and_bad_record(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qa.jsonl", [line for line, _ in MIXED], bom=True)
    expected_bad = {n: words for n, (_, words) in enumerate(MIXED, start=1) if words}
    good_ids = [str(line["id"]) for line, words in MIXED if words is None]  # type: ignore[index]

    lenient = read_qa(path)
    assert [r.id for r in lenient.records] == good_ids  # the BOM did not spoil line 1
    assert [int(p.split(":")[1]) for p in lenient.problems] == sorted(expected_bad)
    for problem in lenient.problems:
        assert problem.startswith(f"{path}:") and expected_bad[int(problem.split(":")[1])] in problem, problem

    with pytest.raises(InputError) as caught:  # fine-tuning: one error listing every bad line
        load_qa(path)
    message = str(caught.value)
    assert f"{len(expected_bad)} problem(s)" in message
    for problem in lenient.problems[:10]:
        assert problem in message

    evals = load_questions(path)  # evals: the same records kept, the same lines skipped
    assert evals.problems == lenient.problems
    assert sorted(q.id for q in evals.questions) == sorted(good_ids)


def test_what_a_record_means_is_one_rule_for_both_readers(tmp_path: Path) -> None:
    lines = [line for line, words in MIXED if words is None]
    path = write_lines(tmp_path / "qa.jsonl", lines)
    records = {r.id: r for r in load_qa(path)}
    questions = {q.id: q for q in load_questions(path).questions}
    assert records.keys() == questions.keys()
    for key, record in records.items():
        question = questions[key]
        assert (question.unanswerable, question.gold, question.label, question.reference, question.line) == (
            record.unanswerable, record.gold, record.label, record.reference, record.line)
        assert record.where == f"{path}:{record.line}"
    assert records["7"].id == "7" and not records["7"].unanswerable
    assert records["u1"].unanswerable and records["u3"].unanswerable and records["u3"].gold is None
    assert sft_example(records["u3"], [])["completion"][0]["content"] == NOT_COVERED
    assert records["c2"].followup and not records["c1"].followup
    update = records["up1"]
    assert (update.gold, update.stale_doc) == ("updates/policy-2026.md", "policies/policy.md")
    assert questions["up1"].as_record_fields()["stale_doc"] == "policies/policy.md"
    assert "stale_doc" not in questions["a"].as_record_fields()  # other records keep their shape
    pubmed = records["pm1"]
    assert (pubmed.label, pubmed.reference, pubmed.gold, pubmed.gold_record_id) == (
        "maybe", "It may be.", "#pm1", "pm1")
    assert pubmed.answer_text() == "Maybe. It may be." and questions["pm1"].type == "yes/no/maybe"


def test_missing_unreadable_or_empty_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such Q/A file"):
        load_qa(tmp_path / "absent.jsonl")
    with pytest.raises(InputError, match="no such Q/A file"):
        load_questions(tmp_path / "absent.jsonl")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(qa("x", answer="café"), ensure_ascii=False).encode("utf-8").replace(b"\xc3\xa9", b"\xe9") + b"\n")
    for reader in (load_qa, load_questions):
        with pytest.raises(InputError, match=rf"{latin1}: not valid UTF-8"):
            reader(latin1)
    with pytest.raises(InputError, match="no Q/A records"):
        load_qa(write_lines(tmp_path / "empty.jsonl", [""]))


def test_train_and_validation_files_must_not_share_questions(tmp_path: Path) -> None:
    train = load_qa(write_lines(tmp_path / "t.jsonl", [qa("a"), qa("b")]))
    validation = load_qa(write_lines(tmp_path / "v.jsonl", [qa("b"), qa("c")]))
    with pytest.raises(InputError, match=r"v.jsonl:1: id 'b' is also in the training file"):
        check_disjoint(train, validation)


@pytest.mark.skipif(not (PUBMEDQA / "dev.jsonl").is_file(), reason="PubMedQA is not in ../shared")
def test_the_shipped_question_sets_load_alike_in_both_readers() -> None:
    for path, count in [(DEMO / "qa" / "train.jsonl", 202), (DEMO / "qa" / "validation.jsonl", 56),
                        (DEMO / "qa" / "test.jsonl", 95), (PUBMEDQA / "dev.jsonl", 500)]:
        records = load_qa(path)
        questions = load_questions(path)
        assert len(records) == count and not questions.problems
        assert sorted(r.id for r in records) == sorted(q.id for q in questions.questions)
    pubmedqa = [QARecord.model_validate(json.loads(line)) for line in
                (PUBMEDQA / "dev.jsonl").read_text().splitlines()[:3]]
    for record in pubmedqa:
        assert record.gold == f"#{record.id}" and not record.unanswerable
        assert record.answer_text() == f"{record.answer.capitalize()}. {record.long_answer}"
