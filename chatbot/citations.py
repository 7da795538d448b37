"""Citations the model did not write: attribute answer sentences to the chunks they come from.

SmolLM2-135M without an adapter almost never writes [n] markers, however it is prompted (the
RAFT-trained adapter does). When an answer cites nothing, each sentence that shares most of its
content words with one retrieved chunk gets that chunk's [n] appended. These are marked as
attributed (``Answer.citations_attributed``), never passed off as the model's own, and evals
count the two kinds separately. A sentence that matches no chunk stays uncited: an answer the
documents do not support is not dressed up as one they do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-/.]*[A-Za-z0-9]|[A-Za-z0-9]")
_STOP = frozenset(
    "the and for with that this from are was were has have had not but can may its their there which "
    "what when where who whom whose will would should could into onto than then them they these those "
    "about after before during each also only such other more most some any all per our your document "
    "documents".split()
)
MIN_SHARED_WORDS = 3
MIN_SHARED_SHARE = 0.5


def _content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if (len(w) >= 3 or w.isdigit()) and w.lower() not in _STOP}


def attribute(answer: str, sources: Sequence[str]) -> tuple[str, list[int]]:
    """Append [n] to sentences supported by source n; returns the new text and the numbers used."""
    vocabularies = [_content_words(s) for s in sources]
    used: list[int] = []
    sentences = _SENTENCE.split(answer.strip())
    out = []
    for sentence in sentences:
        words = _content_words(sentence)
        best, best_shared = 0, 0
        for n, vocabulary in enumerate(vocabularies, start=1):
            shared = len(words & vocabulary)
            if shared > best_shared:
                best, best_shared = n, shared
        if best and best_shared >= MIN_SHARED_WORDS and best_shared >= MIN_SHARED_SHARE * len(words):
            stripped = sentence.rstrip()
            end = stripped[-1] if stripped and stripped[-1] in ".!?" else ""
            sentence = f"{stripped[:-1] if end else stripped} [{best}]{end}"
            if best not in used:
                used.append(best)
        out.append(sentence)
    return " ".join(out), used
