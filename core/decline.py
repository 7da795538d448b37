"""Declining is a decision: P(the documents do not cover the question), from signals one can calibrate.

At 135M parameters a model that is trained to say "The documents do not cover this." says it to
answerable and unanswerable questions alike (the old demo adapter: 50% of each). So the chain
decides before generating, from what retrieval and evidence selection measured, with a logistic
model whose coefficients ``python -m evals calibrate`` fits on the validation set and writes into
``retrieval.decline`` together with the threshold the user picks from the printed trade-off curve.

Features (each in [0, 1] or a cosine):
- ``top_score``: the best chunk's cosine;
- ``best_unit``: the best evidence unit's score (core/evidence.py);
- ``coverage``: the IDF-weighted share of the question's content words found anywhere in the
  retrieved chunks. Words are compared by Snowball stem ("infused" finds "infusion", "fibrate"
  "fibrates") and through the knowledge base's own abbreviations (core/abbreviations.py: "DAPT"
  finds "dual antiplatelet therapy", and the other way round); IDF is over the public chunks
  (KnowledgeBaseTerms), so "chaplain", which no chunk mentions, weighs most and "patient" least.
  On the demo's train + validation questions this raised the cross-validated ROC AUC from 0.894
  (a plain share of unstemmed words) to 0.907;
- ``missing_name``: 1 when the question names something (a capitalised word, or one with a digit,
  not first in the question) that no retrieved chunk contains, compared the same way:
  "Zentravir" is not in the shelf;
- ``followup``: 1 for a later turn (its wording leans on the conversation, so lower scores are normal).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from core.abbreviations import abbreviation_table
from core.evidence import words

if TYPE_CHECKING:
    from core.store import Store

FEATURES = ("top_score", "best_unit", "coverage", "missing_name", "followup")
_NAME = re.compile(r"\b(?:[A-Z][A-Za-z0-9-]{2,}|[A-Za-z]*\d[A-Za-z0-9-]*[A-Za-z][A-Za-z0-9-]*)\b")


def named_terms(question: str) -> list[str]:
    """Words that name something: capitalised (not the question's first word) or mixing digits and letters."""
    found = []
    for match in _NAME.finditer(question):
        if match.start() == len(question) - len(question.lstrip()):
            continue  # "What ..." / "Does ...": capitalised because it starts the question
        found.append(match.group(0).lower())
    return found


@lru_cache(maxsize=1)
def _stemmer():
    import snowballstemmer  # the Snowball English stemmer (pure Python, what Sphinx's search uses)

    return snowballstemmer.stemmer("english")


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    return _stemmer().stemWord(word)  # a vocabulary is small: each word is stemmed once


def terms(text: str) -> set[str]:
    """The stems of a text's content words."""
    return {_stem(w) for w in words(text)}


@dataclass(frozen=True)
class KnowledgeBaseTerms:
    """What the knowledge base's public chunks say, for the features: the abbreviations they
    define and in how many chunks each stem occurs. Empty: every word weighs the same."""

    abbreviations: Mapping[str, str] = field(default_factory=dict)
    chunk_frequency: Mapping[str, int] = field(default_factory=dict)
    chunks: int = 0

    def idf(self, term: str) -> float:
        return math.log((self.chunks + 1) / (1 + self.chunk_frequency.get(term, 0))) if self.chunks else 1.0


def knowledge_base_terms(texts: Iterable[str]) -> KnowledgeBaseTerms:
    texts = list(texts)
    frequency: Counter[str] = Counter()
    for text in texts:
        frequency.update(terms(text))
    return KnowledgeBaseTerms(abbreviation_table(texts), dict(frequency), len(texts))


def public_terms(store: "Store") -> KnowledgeBaseTerms:
    """The public chunks' terms: one payload scroll at start-up (the demo's 246 chunks: well under
    a second; it grows with the collection, about 10 s per 100,000 chunks). An upload's text, which
    other visitors cannot see, never changes how their questions are decided."""
    from core.store import CONTENT_KEY, METADATA_KEY, PUBLIC_SCOPE, SCOPE_KEY

    physical = store.physical_name()
    if physical is None:
        return KnowledgeBaseTerms()
    return knowledge_base_terms(
        record.payload.get(CONTENT_KEY, "") for record in store.scroll(physical)
        if record.payload.get(METADATA_KEY, {}).get(SCOPE_KEY, PUBLIC_SCOPE) == PUBLIC_SCOPE
    )


def chunk_terms(chunk_texts: Sequence[str], abbreviations: Mapping[str, str] | None = None) -> set[str]:
    """The chunks' stems, plus each known abbreviation whose expansion they spell out and each
    expansion's stems whose abbreviation they use: what the chunks say, in either form."""
    joined = "\n".join(chunk_texts)
    found = terms(joined) | set(re.findall(r"[a-z0-9-]+", joined.lower()))
    for abbreviation, expansion in (abbreviations or {}).items():
        spelled = terms(expansion.split(",", 1)[0])
        short = abbreviation.lower()
        if short in found:
            found |= spelled
        elif spelled and spelled <= found:
            found.add(short)
            found |= terms(abbreviation)
    return found


def decline_features(
    question: str, chunk_texts: Sequence[str], top_score: float | None, best_unit: float | None, followup: bool,
    knowledge_base: KnowledgeBaseTerms | None = None,
) -> dict[str, float]:
    knowledge_base = knowledge_base or KnowledgeBaseTerms()
    present = chunk_terms(chunk_texts, knowledge_base.abbreviations) if chunk_texts else set()
    asked = terms(question)
    total = sum(knowledge_base.idf(t) for t in asked)
    coverage = sum(knowledge_base.idf(t) for t in asked & present) / total if total and chunk_texts else 0.0
    missing = any(term not in present and not (terms(term) and terms(term) <= present)
                  for term in named_terms(question))
    return {
        "top_score": float(top_score or 0.0),
        "best_unit": float(best_unit or 0.0),
        "coverage": round(coverage, 4),
        "missing_name": float(missing),
        "followup": float(followup),
    }


def not_covered_probability(features: Mapping[str, float], intercept: float, weights: Mapping[str, float]) -> float:
    z = intercept + sum(weights.get(name, 0.0) * features.get(name, 0.0) for name in FEATURES)
    return 1.0 / (1.0 + math.exp(-max(min(z, 40.0), -40.0)))


def fit_logistic(
    rows: Sequence[Mapping[str, float]], labels: Sequence[int], l2: float = 0.01, steps: int = 3000, rate: float = 0.5
) -> tuple[float, dict[str, float]]:
    """Plain gradient descent on the class-balanced logistic loss (a few hundred rows, five
    features: no need for scikit-learn, which ragtune does not otherwise depend on). Balanced:
    unanswerable questions are few (38 of 258 in the demo's train + validation), and unweighted
    the fit would put every probability below 0.5. Returns (intercept, weights)."""
    n = len(rows)
    if n == 0 or len(set(labels)) < 2:
        raise ValueError("calibration needs both answerable and unanswerable questions")
    positives = sum(labels)
    weight = {1: n / (2 * positives), 0: n / (2 * (n - positives))}
    w = {name: 0.0 for name in FEATURES}
    b = 0.0
    for _ in range(steps):
        grad_w = {name: 0.0 for name in FEATURES}
        grad_b = 0.0
        for row, y in zip(rows, labels):
            error = (not_covered_probability(row, b, w) - y) * weight[y]
            grad_b += error
            for name in FEATURES:
                grad_w[name] += error * row.get(name, 0.0)
        b -= rate * grad_b / n
        for name in FEATURES:
            w[name] -= rate * (grad_w[name] / n + l2 * w[name])
    return round(b, 4), {name: round(value, 4) for name, value in w.items()}
