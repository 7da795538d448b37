"""Clinical abbreviations, both ways: "MI" <-> "myocardial infarction".

Questions use abbreviations ("Max dose if eGFR < 30?") that the documents spell out, and the
other way round. Embedding fine-tuning shows the model both phrasings of each question, so it
learns they mean the same. The table comes from the demo glossaries
(``data/demo/glossary/*.md`` lines ``- **MI** — myocardial infarction (heart attack).`` and
``*.csv`` rows ``abbreviation,expansion,notes``) or, without them, a small built-in table.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from core.abbreviations import clean_expansion, glossary_entry, usable
from finetune.files import InputError

# Used when no glossary is given: common clinical abbreviations of the demo's kind.
BUILTIN: dict[str, str] = {
    "ACS": "acute coronary syndrome",
    "AF": "atrial fibrillation",
    "AKI": "acute kidney injury",
    "BID": "twice daily",
    "BP": "blood pressure",
    "CKD": "chronic kidney disease",
    "DKA": "diabetic ketoacidosis",
    "DVT": "deep vein thrombosis",
    "ECG": "electrocardiogram",
    "ED": "emergency department",
    "eGFR": "estimated glomerular filtration rate",
    "HbA1c": "glycated haemoglobin",
    "HF": "heart failure",
    "HTN": "hypertension",
    "ICU": "intensive care unit",
    "IV": "intravenous",
    "MI": "myocardial infarction",
    "NSTEMI": "non-ST-elevation myocardial infarction",
    "PE": "pulmonary embolism",
    "PRN": "as required",
    "STEMI": "ST-elevation myocardial infarction",
    "T2DM": "type 2 diabetes",
    "TID": "three times daily",
    "VTE": "venous thromboembolism",
}

def load_glossaries(paths: list[Path]) -> dict[str, str]:
    """Abbreviation -> expansion from .md / .csv files (a folder means every such file in it)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in {".md", ".csv"})
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such glossary file or folder")
    table: dict[str, str] = {}
    for file in files:
        entries = _read_csv(file) if file.suffix.lower() == ".csv" else _read_markdown(file)
        for abbreviation, expansion in entries:
            if usable(abbreviation, expansion):
                table.setdefault(abbreviation, expansion)
    if files and not table:
        raise InputError(f"{', '.join(map(str, files))}: no abbreviation entries found")
    return table


def _read_markdown(path: Path) -> list[tuple[str, str]]:
    return [entry for line in path.read_text(encoding="utf-8").splitlines() if (entry := glossary_entry(line))]


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"abbreviation", "expansion"} <= set(reader.fieldnames):
            raise InputError(f"{path}: a glossary CSV needs the columns abbreviation,expansion")
        return [(row["abbreviation"].strip(), clean_expansion(row["expansion"] or ""))
                for row in reader if row.get("abbreviation")]


class AbbreviationSwapper:
    """Expand or contract every known abbreviation in a text, in one pass each way."""

    def __init__(self, table: dict[str, str]):
        self.table = dict(table)
        self.by_expansion = {}
        for abbreviation, expansion in self.table.items():
            self.by_expansion.setdefault(expansion.casefold(), abbreviation)
        longest_first = sorted(self.table, key=len, reverse=True)
        # Case-sensitive, whole tokens: "MI" but not "Mi" in "Minimum", nor "PE" in "PE-type".
        self._abbreviation = re.compile(
            r"(?<![\w-])(" + "|".join(map(re.escape, longest_first)) + r")(?![\w-])"
        ) if self.table else None
        expansions = sorted(self.by_expansion, key=len, reverse=True)
        # Longest first, so "ST-elevation myocardial infarction" becomes STEMI, not "ST-elevation MI".
        self._expansion = re.compile(
            r"(?<![\w-])(" + "|".join(map(re.escape, expansions)) + r")(?![\w-])", re.IGNORECASE
        ) if expansions else None

    def expand(self, text: str) -> str:
        if self._abbreviation is None:
            return text
        return self._abbreviation.sub(lambda m: self.table[m.group(1)], text)

    def contract(self, text: str) -> str:
        if self._expansion is None:
            return text
        return self._expansion.sub(lambda m: self.by_expansion[m.group(1).casefold()], text)

    def variants(self, text: str) -> list[str]:
        """The other phrasings of ``text`` (expanded, contracted), without duplicates or itself."""
        seen = {text}
        found = []
        for variant in (self.expand(text), self.contract(text)):
            if variant not in seen:
                seen.add(variant)
                found.append(variant)
        return found
