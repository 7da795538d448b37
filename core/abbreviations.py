"""The abbreviations a knowledge base defines, read from its own text: "MI" <-> "myocardial infarction".

Two forms of definition are recognised, as writers of guidelines use them:
- glossary lines: ``- **MI** — myocardial infarction (heart attack).``;
- a long form followed by its short form in parentheses: ``dual antiplatelet therapy (DAPT)``,
  matched with the Schwartz & Hearst (2003) algorithm: every character of the short form, right
  to left, found in the words before it, the first one at a word's start. No library packages
  it for plain text (scispaCy's needs spaCy and a model), and it is twenty lines.

The chat's "not covered" decision (core/decline.py) uses the table so that a question asking
about "DAPT after ACS" is not declined because the chunks spell the terms out. The table is read
from the public chunks only: an upload's text, which another visitor cannot see, never changes
how anyone else's question is decided. Fine-tuning's glossary files (finetune/abbreviations.py)
use the same line format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_MD_ENTRY = re.compile(r"^\s*[-*]\s+\*\*(?P<abbr>[^*]+)\*\*\s*[—–:-]+\s*(?P<expansion>.+)$")
_EXPLANATION = re.compile(r"\s*(?:[:;(]|\.\s|\.$| — | – ).*$")
# "(DAPT)", "(eGFR)", "(HbA1c)": 2-10 characters, a letter first, at least one capital.
_PARENTHESISED = re.compile(r"\(([A-Za-z][A-Za-z0-9]{1,9})\)")


def clean_expansion(text: str) -> str:
    """The expansion proper, without its explanation.

    "acute coronary syndrome: the umbrella term ..." -> "acute coronary syndrome";
    "blood pressure, recorded as ..." -> "blood pressure"; "as required (pro re nata)" ->
    "as required"; but a list stays whole: "airway, breathing, circulation, ...: ..." is ABCDE.
    """
    head = _EXPLANATION.sub("", text.strip()).strip()
    if head.count(",") >= 2:
        return head
    return head.split(",", 1)[0].strip()


def usable(abbreviation: str, expansion: str) -> bool:
    # One-letter abbreviations match too much; an "expansion" no longer than its abbreviation
    # is not one.
    return len(abbreviation) >= 2 and len(expansion) > len(abbreviation)


def glossary_entry(line: str) -> tuple[str, str] | None:
    """("MI", "myocardial infarction") from ``- **MI** — myocardial infarction (heart attack).``"""
    match = _MD_ENTRY.match(line)
    if not match:
        return None
    return match["abbr"].strip(), clean_expansion(match["expansion"])


def long_form(short: str, before: str) -> str | None:
    """Schwartz & Hearst's best long form of ``short`` at the end of ``before``, or None."""
    words = before.split()[-min(len(short) + 5, 2 * len(short)):]
    text = " ".join(words)
    s, i = len(short) - 1, len(text) - 1
    while s >= 0:
        c = short[s].lower()
        if not c.isalnum():
            s -= 1
            continue
        # the first character of the short form must start a word of the long form
        while i >= 0 and (text[i].lower() != c or (s == 0 and i > 0 and text[i - 1].isalnum())):
            i -= 1
        if i < 0:
            return None
        i -= 1
        s -= 1
    start = text.rfind(" ", 0, i + 1) + 1
    found = text[start:].strip(" ,;:-")
    return found if len(found.split()) >= 2 or len(found) > len(short) + 2 else None


def defined_in(text: str) -> list[tuple[str, str]]:
    """Every (abbreviation, expansion) the text defines, in order."""
    found = []
    for line in text.splitlines():
        entry = glossary_entry(line)
        if entry:
            found.append(entry)
            continue
        for match in _PARENTHESISED.finditer(line):
            short = match.group(1)
            if not any(ch.isupper() for ch in short):
                continue  # "(daily)", "(see below)": words, not abbreviations
            expansion = long_form(short, line[: match.start()])
            if expansion:
                found.append((short, expansion))
    return found


def abbreviation_table(texts: Iterable[str]) -> dict[str, str]:
    """Abbreviation -> expansion over ``texts``; the first definition of each wins."""
    table: dict[str, str] = {}
    for text in texts:
        for abbreviation, expansion in defined_in(text):
            if usable(abbreviation, expansion):
                table.setdefault(abbreviation, expansion)
    return table

