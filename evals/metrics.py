"""The metrics of ``python -m evals``: pure functions of plain values, no model, no I/O.

Per question (``score_record``) and per mode (``summarize``), so the unit tests can check each
one on hand-made records, and a report can be recomputed from the saved records alone.

Definitions (docs/evals.md says the same, with examples):

- Gold document: a retrieved chunk is gold when its ``source`` is the question's ``gold`` path
  (``monographs/cardivexin.md`` matches ``data/demo/monographs/cardivexin.md``) or, for a gold
  that starts with ``#`` (a JSONL record id such as a PubMedQA PMID), ends with it.
- recall@k: the gold document is among the first k retrieved *chunks*; MRR: 1 / rank of its
  first chunk (0 when it is not in the top 10). Only questions that name a gold document count.
- Closed labels (yes / no / maybe): the generated label is the first of those words in the
  answer ("none", which is wrong, when there is none); the likelihood label is the label whose
  text ("Yes", "No", "Maybe") the model finds most likely as the start of its answer, ties going
  to the label listed first in ``CLOSED_LABELS``; in the mode an adapter's label prior was fitted
  in (``label_prior.json``, evals/labels.py), its offsets are added first.
  Macro-F1 averages the per-label F1 over the
  labels that occur among the gold or the predicted labels ("none" is never a class).
- Free-form answers: SQuAD's token F1 and ROUGE-L (F-measure of the longest common token
  subsequence, tokenised like the ``rouge-score`` package, without stemming), both on the
  answer without its ``[n]`` markers (they are not words of the answer, and ragtune adds them).
- Citations: ``cites_gold`` when a cited source is the gold document (over the answers to
  questions with a gold document, and again over those of them that cite anything); a phantom
  citation is a ``[n]`` with no n-th retrieved chunk behind it (without retrieval, any ``[n]``).
- Declined: the answer contains NOT_COVERED or starts with one of ``REFUSAL_OPENINGS``.
"""

from __future__ import annotations

import re
import statistics
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from core.facts import numbers, unsupported_numbers
from core.prompts import NOT_COVERED
from core.qa import CLOSED_LABELS, closed_label  # noqa: F401  (a reference's label: the Q/A record's rule)
from evals.labels import apply_prior

NO_LABEL = "none"
RECALL_AT: tuple[int, ...] = (1, 5, 10)

# A clear refusal opens the answer; "no" or "not" later in a sentence is not one.
REFUSAL_OPENINGS: tuple[str, ...] = (
    "the documents do not", "the documents don't", "the provided documents do not",
    "the document does not", "the document doesn't", "the provided document does not",
    "i don't know", "i do not know", "i'm not sure", "i am not sure",
    "i cannot answer", "i can't answer", "i cannot find", "i can't find",
    "i don't have", "i do not have", "i'm unable", "i am unable",
    "i'm sorry", "i am sorry", "sorry,", "there is no information", "no information",
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_LABEL_WORD = re.compile(r"\b(" + "|".join(CLOSED_LABELS) + r")\b", re.IGNORECASE)
_CITATION = re.compile(r"\[(\d{1,3})\]")


# -- retrieval ---------------------------------------------------------------------------------
def is_gold(source: str, gold: str | None) -> bool:
    """Whether a chunk's ``source`` belongs to the gold document (see the module docstring)."""
    if not gold or not source:
        return False
    if gold.startswith("#"):
        return source.endswith(gold)
    return source == gold or source.endswith("/" + gold)


def gold_rank(sources: Sequence[str], gold: str | None) -> int | None:
    """1-based rank of the first gold chunk, or None (also when there is no gold)."""
    for rank, source in enumerate(sources, start=1):
        if is_gold(source, gold):
            return rank
    return None


def hit_at(rank: int | None, k: int) -> bool:
    return rank is not None and rank <= k


def reciprocal_rank(rank: int | None) -> float:
    return 1.0 / rank if rank else 0.0


# -- free-form answers -------------------------------------------------------------------------
def squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def without_citations(answer: str) -> str:
    return _CITATION.sub("", answer or "")


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of token precision and recall (bag of words)."""
    predicted, expected = squad_tokens(prediction), squad_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)  # both empty: 1; one empty: 0
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_tokens(text: str) -> list[str]:
    # rouge-score's default tokenizer: lower case, anything but [a-z0-9] separates tokens.
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence, by dynamic programming over two rows (O(len(a)·len(b)))."""
    if len(b) > len(a):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if item == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1), as ``rouge_score.rouge_scorer`` computes it.

    Implemented here rather than depending on ``rouge-score``: it is an LCS and three lines of
    arithmetic, and that package is not installed (nor installable: no network).
    """
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    if not predicted or not expected:
        return 0.0
    common = lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


# -- closed labels -----------------------------------------------------------------------------
def label_from_answer(answer: str) -> str:
    """The first yes / no / maybe word of a generated answer, or NO_LABEL."""
    match = _LABEL_WORD.search(answer or "")
    return match.group(1).lower() if match else NO_LABEL


def label_from_logprobs(logprobs: Mapping[str, float]) -> str:
    """The most likely label; a tie goes to the label listed first in CLOSED_LABELS."""
    if not logprobs:
        return NO_LABEL
    ordered = [label for label in CLOSED_LABELS if label in logprobs] + sorted(
        label for label in logprobs if label not in CLOSED_LABELS
    )
    # max() keeps the first of equal values, and ``ordered`` puts the preferred label first.
    return max(ordered, key=lambda label: logprobs[label])


def accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float | None:
    if not gold:
        return None
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def macro_f1(gold: Sequence[str], predicted: Sequence[str]) -> float | None:
    """Mean per-label F1 over the labels among gold or predicted ones (NO_LABEL is no class)."""
    if not gold:
        return None
    labels = sorted({*gold, *predicted} - {NO_LABEL})
    scores = []
    for label in labels:
        true_positive = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        predicted_count = sum(p == label for p in predicted)
        gold_count = sum(g == label for g in gold)
        denominator = predicted_count + gold_count
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def majority_label(gold: Sequence[str]) -> str | None:
    """The most frequent gold label; a tie goes to the label listed first in CLOSED_LABELS."""
    if not gold:
        return None
    counts = Counter(gold)
    order = {label: i for i, label in enumerate(CLOSED_LABELS)}
    return min(counts, key=lambda label: (-counts[label], order.get(label, len(order)), label))


# -- citations and refusals --------------------------------------------------------------------
def phantom_citations(answer: str, cited: Iterable[int], retrieved: int) -> list[int]:
    """Cited numbers (in the text or the chain's list) with no retrieved chunk behind them."""
    numbers = {int(m.group(1)) for m in _CITATION.finditer(answer or "")} | set(cited)
    return sorted(n for n in numbers if not 1 <= n <= retrieved)


def declined(answer: str) -> bool:
    """NOT_COVERED anywhere in the answer, or a refusal at its start (``REFUSAL_OPENINGS``)."""
    text = " ".join((answer or "").replace("\u2019", "'").split()).lower()
    return NOT_COVERED.lower() in text or text.startswith(REFUSAL_OPENINGS)


# -- one question ------------------------------------------------------------------------------
def score_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Scores of one answered question; ``None`` where a metric does not apply to it.

    Reads the record's raw fields: ``gold``, ``reference``, ``label``, ``unanswerable``,
    ``retrieved`` (list of {source} dicts, or None in a mode without retrieval), ``sources``
    (the chunks the model saw: {n, source, cited}), ``answer``, ``cited``, ``label_logprobs``.
    """
    answer = record.get("answer") or ""
    gold = record.get("gold")
    retrieved = record.get("retrieved")
    sources = record.get("sources") or []
    scores: dict[str, Any] = {}

    if retrieved is not None and gold:
        rank = gold_rank([r["source"] for r in retrieved], gold)
        scores["gold_rank"] = rank
        for k in RECALL_AT:
            scores[f"recall@{k}"] = hit_at(rank, k)
        scores["reciprocal_rank"] = reciprocal_rank(rank)

    label = record.get("label")
    if label:
        scores["label_generated"] = label_from_answer(answer)
        scores["label_generated_correct"] = scores["label_generated"] == label
        logprobs = record.get("label_logprobs")
        if logprobs:
            # The adapter's label prior (evals/labels.py), when its record carries one; the
            # uncorrected label is kept beside it, so the report shows what the prior changed.
            scores["label_likelihood_raw"] = label_from_logprobs(logprobs)
            scores["label_likelihood"] = label_from_logprobs(apply_prior(logprobs, record.get("label_prior")))
            scores["label_likelihood_correct"] = scores["label_likelihood"] == label

    reference = record.get("reference")
    if reference and not record.get("unanswerable"):
        text = without_citations(answer)
        scores["token_f1"] = token_f1(text, reference)
        scores["rouge_l"] = rouge_l(text, reference)

    if retrieved is not None and gold:
        scores["cites_any"] = any(s.get("cited") for s in sources)
        scores["cites_gold"] = any(s.get("cited") and is_gold(s.get("source", ""), gold) for s in sources)
    scores["phantom_citations"] = phantom_citations(answer, record.get("cited") or [], len(sources))
    scores["declined"] = declined(answer)
    scores |= fact_scores(record, scores["declined"])
    return scores


def fact_scores(record: Mapping[str, Any], was_declined: bool) -> dict[str, Any]:
    """The numbers check (core/facts.py): of the reference's numbers, the share the answer states
    (recall); of the numbers the answer states, the share in the reference (precision: listing
    every number of the chunks does not pay); numbers no chunk it was given contains; quotes."""
    answer = record.get("answer") or ""
    reference = record.get("reference") or ""
    out: dict[str, Any] = {}
    if record.get("unanswerable") or record.get("label"):
        return out
    wanted = set(numbers(reference))
    stated = numbers(answer)
    if wanted:
        out["key_number_recall"] = len(wanted & set(stated)) / len(wanted)
        if stated:
            out["key_number_precision"] = sum(n in wanted for n in stated) / len(stated)
    texts = [s["text"] for s in record.get("sources") or [] if s.get("text")]
    if texts and not was_declined:
        out["unsupported_numbers"] = unsupported_numbers(answer, texts, record.get("question") or "")
    quotes = record.get("quotes")
    if quotes is not None and not was_declined:
        out["quotes_shown"] = len(quotes)
        out["quotes_verified"] = all(q.get("verified") for q in quotes)
        out["quotes_removed"] = len(record.get("removed_quotes") or [])
    if record.get("stale_doc") and record.get("retrieved") is not None and not was_declined:
        # Answered from the newer document: its key numbers, not the superseded ones, and the
        # first cited (or, uncited, first shown) source is not the stale document.
        cited = [s for s in record.get("sources") or [] if s.get("cited")] or list(record.get("sources") or [])
        first = cited[0]["source"] if cited else ""
        out["answered_from_newer"] = bool(cited) and not is_gold(first, record["stale_doc"]) and (
            not wanted or bool(wanted & set(stated)))
    return out


# -- one mode ----------------------------------------------------------------------------------
def _mean(values: Iterable[float | int | bool | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-mode metrics from scored records (each with ``scores`` and ``timings``).

    Every value comes with the number of questions behind it (``n_<metric>``); a metric that
    applies to none of the questions is None.
    """
    scored = [r["scores"] for r in records]
    out: dict[str, Any] = {"questions": len(records)}

    with_rank = [s for s in scored if "reciprocal_rank" in s]
    out["n_retrieval"] = len(with_rank)
    for k in RECALL_AT:
        out[f"recall@{k}"] = _mean(s[f"recall@{k}"] for s in with_rank)
    out["mrr"] = _mean(s["reciprocal_rank"] for s in with_rank)

    closed = [r for r in records if r.get("label")]
    gold_labels = [r["label"] for r in closed]
    out["n_closed"] = len(closed)
    generated = [r["scores"]["label_generated"] for r in closed]
    out["accuracy_generated"] = accuracy(gold_labels, generated)
    out["macro_f1_generated"] = macro_f1(gold_labels, generated)
    likely = [r for r in closed if "label_likelihood" in r["scores"]]
    out["n_likelihood"] = len(likely)
    if likely:
        gold_likely = [r["label"] for r in likely]
        predicted_likely = [r["scores"]["label_likelihood"] for r in likely]
        out["accuracy_likelihood"] = accuracy(gold_likely, predicted_likely)
        out["macro_f1_likelihood"] = macro_f1(gold_likely, predicted_likely)
    else:
        out["accuracy_likelihood"] = out["macro_f1_likelihood"] = None
    # Before the adapter's label prior: only where this mode's records carry one (else the same figures).
    prior_used = [r for r in likely if r.get("label_prior")]
    out["n_label_prior"] = len(prior_used) or None
    out["accuracy_likelihood_raw"] = out["macro_f1_likelihood_raw"] = None
    if prior_used:
        raw = [r["scores"].get("label_likelihood_raw", r["scores"]["label_likelihood"]) for r in likely]
        out["accuracy_likelihood_raw"] = accuracy(gold_likely, raw)
        out["macro_f1_likelihood_raw"] = macro_f1(gold_likely, raw)
    majority = majority_label(gold_labels)
    out["majority_label"] = majority
    out["majority_accuracy"] = accuracy(gold_labels, [majority] * len(gold_labels)) if majority else None
    out["majority_macro_f1"] = macro_f1(gold_labels, [majority] * len(gold_labels)) if majority else None

    free = [s for s in scored if "token_f1" in s]
    out["n_free"] = len(free)
    out["token_f1"] = _mean(s["token_f1"] for s in free)
    out["rouge_l"] = _mean(s["rouge_l"] for s in free)

    citing = [s for s in scored if "cites_gold" in s]
    out["n_cites_gold"] = len(citing)
    out["cites_gold"] = _mean(s["cites_gold"] for s in citing)
    # The same among the answers that cite anything: are the citations there right?
    citing_something = [s for s in citing if s["cites_any"]]
    out["n_citing"] = len(citing_something)
    out["cites_gold_when_citing"] = _mean(s["cites_gold"] for s in citing_something)
    out["phantom_citation_share"] = _mean(bool(s["phantom_citations"]) for s in scored)

    unanswerable = [s for r, s in zip(records, scored) if r.get("unanswerable")]
    answerable = [s for r, s in zip(records, scored) if not r.get("unanswerable")]
    out["n_unanswerable"] = len(unanswerable)
    out["declined_unanswerable"] = _mean(s["declined"] for s in unanswerable)
    out["n_answerable"] = len(answerable)
    out["declined_answerable"] = _mean(s["declined"] for s in answerable)

    with_numbers = [s for s in scored if "key_number_recall" in s]
    out["n_key_numbers"] = len(with_numbers)
    out["key_number_recall"] = _mean(s["key_number_recall"] for s in with_numbers)
    stating = [s for s in scored if "key_number_precision" in s]
    out["n_key_number_precision"] = len(stating)
    out["key_number_precision"] = _mean(s["key_number_precision"] for s in stating)
    checked = [s for s in scored if "unsupported_numbers" in s]
    out["n_unsupported_checked"] = len(checked)
    out["unsupported_number_share"] = _mean(bool(s["unsupported_numbers"]) for s in checked)
    quoting = [s for s in scored if s.get("quotes_shown")]
    out["n_quoting"] = len(quoting)
    out["quotes_verified"] = _mean(s["quotes_verified"] for s in quoting)
    newer = [s for s in scored if "answered_from_newer" in s]
    out["n_updates"] = len(newer)
    out["answered_from_newer"] = _mean(s["answered_from_newer"] for s in newer)

    timings = [r.get("timings") or {} for r in records]
    out["ttft_s"] = _mean(t.get("ttft_s") for t in timings)
    # Pooled: all answers' tokens over their decode time. A short answer ("[1]") arrives in one
    # streamed piece, so its own rate is tokens over a millisecond, which would swamp a mean.
    decoding = [t for t in timings if t.get("tokens") and t.get("total_s") is not None and t.get("ttft_s") is not None]
    decode_seconds = sum(t["total_s"] - t["ttft_s"] for t in decoding)
    out["tokens_per_s"] = (sum(t["tokens"] for t in decoding) / decode_seconds if decode_seconds > 0
                           else _mean(t.get("tokens_per_s") for t in timings))
    out["retrieval_ms"] = _mean(t.get("retrieval_ms") for t in timings)
    out["total_s"] = _mean(t.get("total_s") for t in timings)
    return out
