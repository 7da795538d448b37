"""Making text from users, documents and the model safe to show as Markdown in the browser."""

from __future__ import annotations

import html
import re
from typing import Any

_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
SOURCE_PREVIEW_CHARS = 700


def safe_markdown(text: str) -> str:
    """Text from a user, a document or the model, made inert for Markdown rendering.

    HTML is escaped (shown, never run) and Markdown images are reduced to their alt text: an
    image URL is how a poisoned answer would leak data to a third party (OWASP LLM05).
    """
    return html.escape(_IMAGE.sub(r"\1", text or ""), quote=False)


def sources_markdown(sources: list[dict[str, Any]], attributed: bool = False) -> str:
    if not sources:
        return "_No sources for this answer._"
    lines = []
    if attributed:
        lines.append("_Citations were added by ragtune from matching text; the model wrote none._\n")
    for s in sources:
        section = s.get("section") or ""
        if section.startswith(s["title"] + " > "):
            section = section[len(s["title"]) + 3:]  # the heading path repeats the title
        where = f", page {s['page']}" if s.get("page") else (f" — {section}" if section and section != s["title"] else "")
        mark = "**cited**" if s.get("cited") else "not cited"
        preview = s["text"] if len(s["text"]) <= SOURCE_PREVIEW_CHARS else s["text"][:SOURCE_PREVIEW_CHARS] + " …"
        lines.append(
            f"**[{s['n']}] {safe_markdown(s['title'])}**{safe_markdown(where)}  \n"
            f"`{safe_markdown(s['source'])}` · score {s['score']:.2f} · {mark}\n\n"
            # Headings inside a chunk are shown as bold lines, not page-sized headings.
            + "\n".join(f"> {_flatten_heading(safe_markdown(line))}" for line in preview.splitlines() if line.strip())
        )
    return "\n\n".join(lines)


def _flatten_heading(line: str) -> str:
    stripped = line.lstrip()
    if stripped.startswith("#"):
        return f"**{stripped.lstrip('#').strip()}**"
    return line
