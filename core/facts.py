"""The facts an answer states that can be checked mechanically: its numbers.

Doses, eGFR bands, hours and protocol numbers are where a small model's paraphrase goes wrong and
where a reader is hurt most by a wrong answer, so evals count them and the chain checks them
against the chunks the model was given. Plain regular expressions: no library normalises
"1,000", "0.5" and "30-44" the way a clinical text means them.
"""

from __future__ import annotations

import re

# A number not glued to letters (so "T2DM", "CYP3A4" and "v2" are names, not numbers), with an
# optional thousands separator and decimal part. Citation markers like "[2]" are removed first.
_CITATION = re.compile(r"\[\d+(?:\s*,\s*\d+)*\]")
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?![\w]|\.\d)")


def numbers(text: str) -> list[str]:
    """The numbers ``text`` states, normalised ("1,000" -> "1000", "2.50" -> "2.5"), in order,
    without repeats. A range "30-44" or "30–44" states both ends."""
    text = _CITATION.sub(" ", text or "")
    found: list[str] = []
    for match in _NUMBER.finditer(text):
        whole = match.group(1).replace(",", "")
        whole = str(int(whole)) if whole else "0"
        fraction = (match.group(2) or "").rstrip("0")
        value = f"{whole}.{fraction}" if fraction else whole
        if value not in found:
            found.append(value)
    return found


def unsupported_numbers(answer: str, evidence: list[str], question: str = "") -> list[str]:
    """Numbers the answer states that neither the evidence it was given nor the question contains."""
    known = set(numbers(question))
    for text in evidence:
        known.update(numbers(text))
    return [n for n in numbers(answer) if n not in known]
