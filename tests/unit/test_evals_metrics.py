"""Every metric of evals.metrics on hand-made records whose answers are worked out by hand."""

from __future__ import annotations

import pytest

from core.prompts import NOT_COVERED
from evals.metrics import (
    NO_LABEL, accuracy, closed_label, declined, gold_rank, hit_at, is_gold, label_from_answer,
    label_from_logprobs, lcs_length, macro_f1, majority_label, phantom_citations, reciprocal_rank, rouge_l,
    score_record, summarize, token_f1, without_citations,
)


# -- retrieval ---------------------------------------------------------------------------------
def test_gold_matches_paths_below_the_knowledge_base_and_jsonl_record_ids() -> None:
    assert is_gold("data/demo/monographs/cardivexin.md", "monographs/cardivexin.md")
    assert is_gold("monographs/cardivexin.md", "monographs/cardivexin.md")
    assert not is_gold("data/demo/monographs/not-cardivexin.md", "cardivexin.md")  # a whole path part
    assert is_gold("data/demo/faq/staff-faq.jsonl#faq-002", "faq/staff-faq.jsonl#faq-002")
    assert not is_gold("data/demo/faq/staff-faq.jsonl#faq-0021", "faq/staff-faq.jsonl#faq-002")
    assert is_gold("../shared/data/pubmedqa/corpus.jsonl#10340286", "#10340286")
    assert not is_gold("../shared/data/pubmedqa/corpus.jsonl#110340286", "#10340286")
    assert not is_gold("data/demo/monographs/cardivexin.md", None)  # no gold id
    assert not is_gold("", "monographs/cardivexin.md")


def test_rank_recall_and_reciprocal_rank() -> None:
    retrieved = ["d/a.md", "d/b.md", "d/gold.md", "d/gold.md"]
    assert gold_rank(retrieved, "gold.md") == 3  # the first of its chunks
    assert [hit_at(3, k) for k in (1, 2, 3, 5)] == [False, False, True, True]
    assert reciprocal_rank(3) == pytest.approx(1 / 3)
    assert gold_rank(retrieved, "missing.md") is None and not hit_at(None, 10) and reciprocal_rank(None) == 0.0
    assert gold_rank([], "gold.md") is None
    assert gold_rank(retrieved, None) is None


# -- free-form answers -------------------------------------------------------------------------
def test_token_f1_is_squads() -> None:
    # SQuAD normalisation drops case, punctuation and articles: "The cat sat." == "cat sat"
    assert token_f1("The cat sat.", "cat sat") == 1.0
    # 2 of 3 predicted tokens are right, 2 of 4 reference tokens found: P=2/3, R=1/2, F1=4/7
    assert token_f1("ten mg daily", "10 mg once daily") == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert token_f1("mg mg mg", "mg") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))  # counts, not sets
    assert token_f1("", "10 mg") == 0.0  # empty answer
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("no overlap", "entirely different") == 0.0


def test_rouge_l_is_the_lcs_f_measure() -> None:
    assert lcs_length("a b c d e".split(), "a c e".split()) == 3
    assert lcs_length("x y".split(), []) == 0
    # LCS("police killed the gunman", "police kill the gunman") = police, the, gunman = 3 of 4 and 4
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # order matters, unlike token F1: the LCS of "b a" and "a b" is 1 token
    assert rouge_l("b a", "a b") == pytest.approx(0.5) and token_f1("b a", "a b") == 1.0
    assert rouge_l("10 mg/kg!", "10 MG kg") == 1.0  # lower case, non-alphanumerics split
    assert without_citations("10 mg [1][12].") == "10 mg ."
    assert rouge_l("", "anything") == 0.0 and rouge_l("anything", "") == 0.0


# -- closed labels -----------------------------------------------------------------------------
def test_labels_from_references_and_generated_answers() -> None:
    assert closed_label("Yes") == "yes" and closed_label(" maybe. ") == "maybe"
    assert closed_label("Yes. Co-prescribed Glucarnil offsets it.") is None  # free text, not a label
    assert closed_label(None) is None
    assert label_from_answer("No, it does not; yes in some cases.") == "no"  # the first one
    assert label_from_answer("Maybe: the evidence is mixed") == "maybe"
    assert label_from_answer("Nobody knows, yesterday was different") == NO_LABEL  # whole words only
    assert label_from_answer("") == NO_LABEL


def test_likelihood_label_and_deterministic_ties() -> None:
    assert label_from_logprobs({"yes": -2.0, "no": -0.5, "maybe": -3.0}) == "no"
    assert label_from_logprobs({"yes": -1.0, "no": -1.0, "maybe": -1.0}) == "yes"  # tie: first of yes, no, maybe
    assert label_from_logprobs({"maybe": -1.0, "no": -1.0, "yes": -4.0}) == "no"  # whatever the dict order
    assert label_from_logprobs({}) == NO_LABEL


def test_accuracy_and_macro_f1() -> None:
    gold = ["yes", "yes", "no", "maybe"]
    predicted = ["yes", "no", "no", NO_LABEL]
    assert accuracy(gold, predicted) == 0.5
    # yes: TP 1, 1 predicted, 2 gold -> 2/3; no: TP 1, 2 predicted, 1 gold -> 2/3; maybe: 0
    assert macro_f1(gold, predicted) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert macro_f1(["yes", "yes"], ["yes", "yes"]) == 1.0  # only the labels that occur count
    assert macro_f1(["yes"], [NO_LABEL]) == 0.0  # "none" is no class, yet wrong
    assert accuracy([], []) is None and macro_f1([], []) is None


def test_majority_baseline_label_and_its_ties() -> None:
    assert majority_label(["no", "yes", "yes", "maybe"]) == "yes"
    assert majority_label(["maybe", "no", "no", "maybe"]) == "no"  # tie: no comes before maybe
    assert majority_label([]) is None


def test_majority_baseline_matches_pubmedqa_dev_counts() -> None:
    gold = ["yes"] * 276 + ["no"] * 169 + ["maybe"] * 55  # dev.jsonl: majority baseline 55.2 %
    always_yes = ["yes"] * len(gold)
    assert accuracy(gold, always_yes) == pytest.approx(0.552)
    assert macro_f1(gold, always_yes) == pytest.approx((2 * 276 / (500 + 276)) / 3)


# -- citations and refusals --------------------------------------------------------------------
def test_phantom_citations_are_numbers_with_nothing_retrieved_behind_them() -> None:
    assert phantom_citations("Dose 10 mg [1][2].", [1, 2], retrieved=2) == []
    assert phantom_citations("See [3] and [0].", [], retrieved=2) == [0, 3]
    assert phantom_citations("As shown [1].", [], retrieved=0) == [1]  # a mode without retrieval
    assert phantom_citations("", [5], retrieved=4) == [5]  # the chain's own list is checked too


def test_declined_means_not_covered_or_a_refusal_at_the_start() -> None:
    assert declined(NOT_COVERED)
    assert declined("I looked. " + NOT_COVERED.upper())
    assert declined("I don\u2019t know the gentamicin dose.")
    assert declined("  Sorry, I cannot help with that.")
    assert declined("The document does not mention a nursery.")
    assert not declined("The document contains a ward list but does not name a nursery.")  # a hedge, not a refusal
    assert not declined("The dose is 5 mg/kg; I don't know about children.")  # not at the start
    assert not declined("No, it is not contraindicated.")
    assert not declined("")


# -- whole records -----------------------------------------------------------------------------
def _record(**fields):
    base = {"mode": "rag", "id": "q", "answer": "", "gold": None, "reference": None, "label": None,
            "unanswerable": False, "retrieved": None, "sources": [], "cited": [], "timings": {}}
    return base | fields


def test_score_record_for_a_retrieving_mode() -> None:
    record = _record(
        gold="monographs/cardivexin.md", reference="Start at 10 mg once daily.",
        answer="Start at 10 mg once daily [2].", cited=[2],
        retrieved=[{"source": "data/demo/monographs/glucarnil.md"}, {"source": "data/demo/monographs/cardivexin.md"}],
        sources=[{"n": 1, "source": "data/demo/monographs/glucarnil.md", "cited": False},
                 {"n": 2, "source": "data/demo/monographs/cardivexin.md", "cited": True}],
    )
    scores = score_record(record)
    assert scores["gold_rank"] == 2 and scores["recall@1"] is False and scores["recall@5"] is True
    assert scores["reciprocal_rank"] == 0.5
    assert scores["token_f1"] == pytest.approx(1.0) and scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cites_gold"] is True and scores["cites_any"] is True
    assert scores["phantom_citations"] == [] and scores["declined"] is False


def test_score_record_without_gold_without_retrieval_and_with_an_empty_answer() -> None:
    scores = score_record(_record(mode="base", reference="Ten mg.", answer=""))
    assert "recall@1" not in scores and "cites_gold" not in scores  # no retrieval, no gold: not applicable
    assert scores["token_f1"] == 0.0 and scores["rouge_l"] == 0.0
    no_gold = score_record(_record(retrieved=[{"source": "x.md"}], unanswerable=True, answer=NOT_COVERED))
    assert "recall@1" not in no_gold and "token_f1" not in no_gold and no_gold["declined"] is True


def test_score_record_for_a_closed_label() -> None:
    scores = score_record(_record(label="no", answer="No. The trial found no effect.",
                                  label_logprobs={"yes": -0.7, "no": -0.7, "maybe": -2.0}))
    assert scores["label_generated"] == "no" and scores["label_generated_correct"] is True
    assert scores["label_likelihood"] == "yes" and scores["label_likelihood_correct"] is False  # tie -> yes


def test_summarize_a_mode() -> None:
    records = [
        _record(id="a", gold="g.md", reference="alpha beta", answer="alpha beta [1]", cited=[1],
                retrieved=[{"source": "d/g.md"}], sources=[{"n": 1, "source": "d/g.md", "cited": True}],
                timings={"ttft_s": 1.0, "tokens_per_s": 20.0, "retrieval_ms": 10.0, "total_s": 2.0}),
        _record(id="b", gold="g.md", reference="gamma", answer="delta [7]",
                retrieved=[{"source": "d/x.md"}] * 5 + [{"source": "d/g.md"}],
                sources=[{"n": 1, "source": "d/x.md", "cited": False}],
                timings={"ttft_s": 3.0, "tokens_per_s": 10.0, "retrieval_ms": 30.0, "total_s": 4.0}),
        _record(id="c", unanswerable=True, answer=NOT_COVERED, retrieved=[],
                timings={"retrieval_ms": 20.0, "total_s": 0.5}),
        _record(id="d", label="yes", answer="Yes.", label_logprobs={"yes": -0.1, "no": -3.0, "maybe": -4.0},
                retrieved=[], timings={"total_s": 1.5}),
        _record(id="e", label="no", answer="I think yes", label_logprobs={"yes": -2.0, "no": -0.2, "maybe": -4.0},
                retrieved=[], timings={"total_s": 2.0}),
    ]
    for r in records:
        r["scores"] = score_record(r)
    s = summarize(records)
    assert s["questions"] == 5 and s["n_retrieval"] == 2
    assert (s["recall@1"], s["recall@5"], s["recall@10"]) == (0.5, 0.5, 1.0)
    assert s["mrr"] == pytest.approx((1 + 1 / 6) / 2)
    assert s["n_closed"] == 2 and s["accuracy_generated"] == 0.5 and s["accuracy_likelihood"] == 1.0
    assert s["majority_label"] == "yes" and s["majority_accuracy"] == 0.5  # tie yes/no -> yes
    assert s["n_free"] == 2 and s["token_f1"] == pytest.approx(0.5)  # 1.0 and 0.0
    assert s["n_citing"] == 1 and s["cites_gold_when_citing"] == 1.0  # only "a" cites anything
    assert s["cites_gold"] == 0.5 and s["phantom_citation_share"] == pytest.approx(1 / 5)  # [7] of 1 source
    assert s["declined_unanswerable"] == 1.0 and s["declined_answerable"] == 0.0
    assert s["ttft_s"] == 2.0 and s["tokens_per_s"] == 15.0 and s["retrieval_ms"] == 20.0
    assert s["total_s"] == pytest.approx(10.0 / 5)


def test_tokens_per_second_pools_tokens_over_decode_time() -> None:
    long = {"tokens": 100, "ttft_s": 1.0, "total_s": 6.0, "tokens_per_s": 20.0}
    one_piece = {"tokens": 3, "ttft_s": 1.0, "total_s": 1.001, "tokens_per_s": 2801.0}  # "[1]" streamed at once
    records = [_record(id="a", answer="x", retrieved=[], timings=long),
               _record(id="b", answer="[1]", retrieved=[], timings=one_piece)]
    for r in records:
        r["scores"] = score_record(r)
    assert summarize(records)["tokens_per_s"] == pytest.approx(103 / 5.001)  # not the mean, 1410


def test_summarize_nothing_applies() -> None:
    s = summarize([])
    assert s["questions"] == 0 and s["mrr"] is None and s["accuracy_generated"] is None
    assert s["token_f1"] is None and s["total_s"] is None and s["n_closed"] == 0
