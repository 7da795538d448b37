"""Evidence first: the sentences of the retrieved chunks that answer the question.

A 135M model reads four 200-token chunks badly: it paraphrases the wrong sentence and drops the
dose. So the chain narrows what the model reads to the few *evidence units* (sentences, list
items, table rows with their header) that answer, keeps each unit under its chunk's number [n],
and shows the user the exact unit with each citation. The same selection writes the quotes of
the fine-tuning targets (finetune/data.py), so the adapter learns to copy what it is shown.

A unit's score mixes four signals, each cheap and each covering the others' blind spot:

- the embedder's cosine between question and unit (meaning, paraphrase);
- lexical coverage: the share of the question's rare words (IDF over the retrieved units) that
  the unit contains: exact names ("Quorivelle", "eGFR", a protocol number) are where MiniLM is weakest;
- a range match: the question's number falls inside a range the unit states ("eGFR 20" against a
  row "15-29 mL/min"), which neither of the first two sees;
- the chunk's retrieval rank (a prior: the retriever saw the whole chunk).

Weights (``retrieval.evidence``) were chosen on the demo train + validation sets: key-number
recall of the top 2 units 0.711 against 0.617 for cosine alone (the extractive baseline's choice).
Hand-written: LangChain's document compressors (EmbeddingsFilter) score whole documents or
fixed splits by cosine only, which is that baseline.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.facts import numbers

if TYPE_CHECKING:
    from langchain_core.embeddings import Embeddings

    from core.settings import EvidenceSettings

# Sentence ends: ., ! or ? followed by space and an upper-case letter, digit, quote or bracket.
# Abbreviations such as "e.g." or "approx." are followed by lower case and do not split.
_SENTENCE_END = re.compile(
    r"(?<=[.!?])(?<!\bext\.)(?<!\bno\.)(?<!\bNo\.)(?<!\bvs\.)(?<!\bDr\.)(?<!\bapprox\.)(?<!\bref\.)"
    r"\s+(?=[A-Z0-9\"'(\[])"
)
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,2}[.)])\s+")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}")
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_RANGE = re.compile(
    r"(\d+(?:\.\d+)?)\s*(?:-|–|to)\s*(\d+(?:\.\d+)?)"
    r"|(?:below|under|less than|<|≤|up to)\s*(\d+(?:\.\d+)?)"
    r"|(?:above|over|more than|at least|>|≥)\s*(\d+(?:\.\d+)?)",
    re.IGNORECASE,
)
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being it its "
    "this that these those what which who whom whose when where why how do does did can could should "
    "would will shall may might must i we you he she they them our your their my me us there here "
    "than then so such not no any all each per about into over under up down out off more most less "
    "also only just very much many one some other same both either neither own too again further "
    "once patient patients".split()
)


@dataclass(frozen=True)
class EvidenceUnit:
    """One sentence, list item or table row of a retrieved chunk."""

    n: int  # the chunk's number, [n] in the prompt and the answer
    index: int  # position in its chunk (what the sources panel highlights)
    text: str  # the unit as it stands in the chunk
    context: str = ""  # a table row's header row; "" otherwise
    score: float = 0.0

    def for_prompt(self) -> str:
        return f"{self.context}\n{self.text}" if self.context else self.text


_HEADING = re.compile(r"^\s*#")


def _joined_lines(text: str) -> list[str]:
    """Lines with hard-wrapped continuations (plain text files wrap at ~72 characters) joined to
    the line they continue: a line that starts in lower case, or follows one ending mid-sentence
    (a comma, a word), belongs to it, unless either is a heading, a table row or a list item."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        previous = lines[-1] if lines else ""
        continues = (
            line and previous
            and not _HEADING.match(previous) and not previous.startswith("|")
            and not _HEADING.match(line) and not line.startswith("|") and not _BULLET.match(line)
            and (line[0].islower() or previous.endswith((",", ";", "(", "-", "and", "or")))
        )
        if continues:
            lines[-1] = f"{previous} {line}"
        else:
            lines.append(line)
    return lines


def split_units(text: str) -> list[tuple[str, str]]:
    """(unit, context) pairs: sentences, list items, and table rows with their header as context."""
    units: list[tuple[str, str]] = []
    header = ""
    for raw in _joined_lines(text or ""):
        line = raw.strip()
        if not line:
            header = ""
            continue
        if line.startswith("|"):
            if _TABLE_RULE.match(line):
                continue
            if not header:
                header = line  # the first row of a table names its columns: context, not evidence
            else:
                units.append((line, header))
            continue
        header = ""
        if _HEADING.match(line):
            continue  # a heading names what follows; it states nothing a quote could rest on
        line = _BULLET.sub("", line)
        units.extend((sentence.strip(), "") for sentence in _SENTENCE_END.split(line) if sentence.strip())
    return units


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def _ranges(text: str) -> list[tuple[float, float]]:
    found = []
    for m in _RANGE.finditer(text):
        if m.group(1):
            low, high = sorted((float(m.group(1)), float(m.group(2))))
        elif m.group(3):
            low, high = float("-inf"), float(m.group(3))
        else:
            low, high = float(m.group(4)), float("inf")
        found.append((low, high))
    return found


def range_match(question: str, unit: str) -> bool:
    """The question states a number that falls inside a range the unit states."""
    asked = [float(n) for n in numbers(question)]
    return any(low <= value <= high for value in asked for low, high in _ranges(unit))


class EvidenceSelector:
    """Ranks the units of retrieved chunks for a question; ``select`` keeps the best few."""

    def __init__(self, embeddings: "Embeddings", settings: "EvidenceSettings"):
        self.embeddings = embeddings
        self.settings = settings

    def rank(self, question: str, chunks: Sequence[tuple[int, str]]) -> list[EvidenceUnit]:
        """All units of ``chunks`` ((n, text) in retrieval order), best first."""
        candidates: list[tuple[int, int, int, str, str]] = []  # (rank, n, index, text, context)
        for rank, (n, text) in enumerate(chunks):
            for index, (unit, context) in enumerate(split_units(text)):
                candidates.append((rank, n, index, unit, context))
        if not candidates:
            return []
        texts = [f"{context}\n{unit}" if context else unit for _, _, _, unit, context in candidates]
        vectors = self.embeddings.embed_documents(texts)
        query = self.embeddings.embed_query(question)
        lexical = lexical_coverage(question, texts)
        w = self.settings
        scored = []
        for (rank, n, index, unit, context), text, vector, covered in zip(candidates, texts, vectors, lexical):
            score = (
                _cosine(query, vector)
                + w.lexical_weight * covered
                + w.range_weight * range_match(question, text)
                + w.rank_weight / (rank + 1)
            )
            scored.append(EvidenceUnit(n=n, index=index, text=unit, context=context, score=round(score, 4)))
        return sorted(scored, key=lambda u: -u.score)

    def select(self, question: str, chunks: Sequence[tuple[int, str]], limit: int | None = None) -> list[EvidenceUnit]:
        ranked = self.rank(question, chunks)
        return ranked[: limit or self.settings.units]


def lexical_coverage(question: str, texts: Sequence[str]) -> list[float]:
    """For each text, the IDF-weighted share of the question's words it contains. IDF is taken
    over ``texts`` themselves: a word in every retrieved unit ("dose") tells them apart least."""
    asked = set(words(question))
    if not asked:
        return [0.0] * len(texts)
    bags = [set(words(t)) for t in texts]
    frequency = Counter(w for bag in bags for w in bag if w in asked)
    idf = {w: math.log(1 + len(texts) / (1 + frequency[w])) for w in asked}
    total = sum(idf.values())
    return [sum(idf[w] for w in asked & bag) / total for bag in bags]


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def closest_sentences(
    embeddings: "Embeddings", question: str, chunks: Sequence[tuple[int, str]], limit: int = 2
) -> list[EvidenceUnit]:
    """The extractive baseline of the evals: the ``limit`` units closest to the question by the
    embedder's cosine alone. Generation has to beat this to earn its place."""
    units = [(n, i, u, c) for n, text in chunks for i, (u, c) in enumerate(split_units(text))]
    if not units:
        return []
    vectors = embeddings.embed_documents([f"{c}\n{u}" if c else u for _, _, u, c in units])
    query = embeddings.embed_query(question)
    scored = [EvidenceUnit(n=n, index=i, text=u, context=c, score=round(_cosine(query, v), 4))
              for (n, i, u, c), v in zip(units, vectors)]
    return sorted(scored, key=lambda u: -u.score)[:limit]
