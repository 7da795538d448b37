"""Declining is a decision: P(the documents do not cover the question), from signals one can calibrate.

At 135M parameters a model that is trained to say "The documents do not cover this." says it to
answerable and unanswerable questions alike (the old demo adapter: 50% of each). So the chain
decides before generating, from what retrieval and evidence selection measured, with a logistic
model whose coefficients ``python -m evals calibrate`` fits on the validation set and writes into
``retrieval.decline`` together with the threshold the user picks from the printed trade-off curve.

Features (each in [0, 1] or a cosine):
- ``top_score``: the best chunk's cosine;
- ``best_unit``: the best evidence unit's score (core/evidence.py);
- ``coverage``: IDF-weighted share of the question's words found anywhere in the retrieved chunks;
- ``missing_name``: 1 when the question names something (a capitalised word, or one with a digit,
  not first in the question) that no retrieved chunk contains: "Zentravir" is not in the shelf;
- ``followup``: 1 for a later turn (its wording leans on the conversation, so lower scores are normal).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from core.evidence import lexical_coverage, words

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


def decline_features(
    question: str, chunk_texts: Sequence[str], top_score: float | None, best_unit: float | None, followup: bool
) -> dict[str, float]:
    joined = "\n".join(chunk_texts)
    coverage = lexical_coverage(question, [joined])[0] if chunk_texts and words(question) else 0.0
    present = set(words(joined)) | set(re.findall(r"[a-z0-9-]+", joined.lower()))
    missing = any(term not in present for term in named_terms(question))
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
    """Plain gradient descent on the logistic loss (a few hundred rows, five features: no need for
    scikit-learn, which ragtune does not otherwise depend on). Returns (intercept, weights)."""
    n = len(rows)
    if n == 0 or len(set(labels)) < 2:
        raise ValueError("calibration needs both answerable and unanswerable questions")
    w = {name: 0.0 for name in FEATURES}
    b = 0.0
    for _ in range(steps):
        grad_w = {name: 0.0 for name in FEATURES}
        grad_b = 0.0
        for row, y in zip(rows, labels):
            error = not_covered_probability(row, b, w) - y
            grad_b += error
            for name in FEATURES:
                grad_w[name] += error * row.get(name, 0.0)
        b -= rate * grad_b / n
        for name in FEATURES:
            w[name] -= rate * (grad_w[name] / n + l2 * w[name])
    return round(b, 4), {name: round(value, 4) for name, value in w.items()}
