"""The follow-up query comparison (python -m evals.followups): which cases it measures."""

from evals.followups import followup_cases, rules, subject_change_cases
from evals.questions import EvalQuestion


def question(id: str, gold: str | None, conversation: str | None = None, turn: int | None = None,
             unanswerable: bool = False) -> EvalQuestion:
    return EvalQuestion(id=id, question=f"q {id}", reference=None, label=None, gold=gold,
                        unanswerable=unanswerable, conversation_id=conversation, turn=turn)


QUESTIONS = [
    question("c1-2", "a.md", "c1", 2), question("c1-1", "a.md", "c1", 1), question("c1-3", None, "c1", 3),
    question("s1", "a.md"), question("s2", "b.md"), question("s3", "c.md"), question("u1", None, unanswerable=True),
]


def test_follow_up_cases_are_later_turns_with_a_gold_document_and_their_history() -> None:
    cases = followup_cases(QUESTIONS)
    assert [(q.id, history) for q, history in cases] == [("c1-2", [("q c1-1", "")])]  # c1-3 has no gold


def test_subject_changes_put_questions_of_other_documents_first() -> None:
    cases = subject_change_cases(QUESTIONS, 2, seed=0)
    assert [q.id for q, _ in cases] == ["s1", "s2", "s3"]  # standalone, answerable
    for q, history in cases:
        assert len(history) == 2 and q.question not in [asked for asked, _ in history]
    s1_history = [asked for asked, _ in cases[0][1]]
    assert "q c1-1" not in s1_history and "q c1-2" not in s1_history  # same gold document as s1
    assert subject_change_cases(QUESTIONS, 2, seed=0) == cases


def test_the_rules_compared() -> None:
    history = [("first", ""), ("second", "")]
    compared = rules(2, {"third": 0.2, "second third": 0.9, "first second third": 0.5}.get)
    assert compared["previous"]("third", history) == "second third"
    assert compared["last-2"]("third", history) == "first second third"
    assert compared["best"]("third", history) == "second third"
