"""Text from outside (questions, titles, file names) normalised before it is stored or shown.

Control characters have no place in a question or a title: a NUL or an escape sequence stored
verbatim ends up in SQLite, in prompts and in the page. Bidirectional overrides (U+202E and
friends) make a name display differently from what it is ("invoice\u202efdp.exe" shows as
"invoiceexe.pdf"), so they are removed wherever text is shown or names a file.
"""

from __future__ import annotations

import unicodedata

# Bidirectional embeddings, overrides and isolates, the implicit marks, and the byte-order mark.
_BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\ufeff"
_REMOVE = dict.fromkeys(map(ord, _BIDI_CONTROLS))
MAX_FILENAME_CHARS = 120


def clean_text(text: str, *, multiline: bool = True) -> str:
    """NFC-normalised text without control characters (newlines and tabs kept when ``multiline``)
    and without bidirectional controls. Line ends become ``\\n``."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).translate(_REMOVE)
    out = []
    for ch in text:
        if ch in "\n\t":
            out.append(ch if multiline else " ")
        elif unicodedata.category(ch) != "Cc":  # Cc: C0/C1 controls, NUL, DEL, ESC
            out.append(ch)
    return "".join(out)


def clean_filename(name: str, fallback: str = "upload") -> str:
    """A file name safe to store and show: the last path part only, one line, no control or
    bidirectional characters, not hidden (no leading dot), at most 120 characters (suffix kept)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = " ".join(clean_text(base, multiline=False).split())
    base = base.lstrip(". ").replace(":", "_")
    if not base:
        return fallback
    if len(base) > MAX_FILENAME_CHARS:
        stem, dot, suffix = base.rpartition(".")
        suffix = f".{suffix}" if dot and len(suffix) <= 10 else ""
        base = (stem if suffix else base)[: MAX_FILENAME_CHARS - len(suffix)] + suffix
    return base
