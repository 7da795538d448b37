"""Text from users, documents and the model, turned into inert HTML for the page.

A poisoned document or an answer the model was talked into can carry markup meant to run in
the visitor's browser or to fetch a URL without a click (OWASP LLM05). Earlier regular
expressions missed reference-style images (``![a][r]`` + ``[r]: URL``) and nested brackets in
alt text, and Chromium fetched both. So Markdown is parsed by a real parser (markdown-it-py,
raw HTML off: it shows as text) and the result goes through an allow-list sanitiser (nh3,
Ammonia): no ``img``, no ``a``, no attributes at all. Images become their alt text; links
become their text, with an external address shown after it as text, never clickable.

The page then shows this HTML without parsing it as Markdown again: the chat with
``render_markdown=False``; ``gr.Markdown`` panels get one single-line HTML block (Markdown
leaves a block of HTML as it is until a blank line) whose Markdown punctuation is written as
character references, so nothing in it can become Markdown syntax a second time. The CSP
``img-src 'self' data:`` (chatbot/web.py) is the browser's own backstop.
"""

from __future__ import annotations

import html
import re
from typing import Any

import nh3
from markdown_it import MarkdownIt

from core.text import clean_text
from ingest.uploads import uploaded_name

SOURCE_PREVIEW_CHARS = 700
ALLOWED_TAGS = {
    "p", "br", "strong", "em", "del", "code", "pre", "blockquote", "ul", "ol", "li", "hr",
    "table", "thead", "tbody", "tr", "th", "td", "div", "mark",
}
_TAG = re.compile(r"(<[^>]*>)")
# Characters that mean something to a Markdown parser, as numeric references: a browser shows
# them unchanged, a Markdown parser sees no syntax in them. '&' is already escaped by nh3.
_INERT = {ord(c): f"&#{ord(c)};" for c in "[]()!*_~`\\$|:#<>{}"}


def _parser() -> MarkdownIt:
    parser = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True})
    parser.enable(["table", "strikethrough"])
    rules = parser.renderer.rules

    def image(tokens, idx, options, env):  # the alt text, nested brackets and all
        return html.escape(parser.renderer.renderInlineAsText(tokens[idx].children or [], options, env))

    def link_open(tokens, idx, options, env):
        env.setdefault("links", []).append(tokens[idx].attrGet("href") or "")
        return ""

    def link_close(tokens, idx, options, env):
        href = env["links"].pop() if env.get("links") else ""
        text = tokens[idx - 1].content if idx and tokens[idx - 1].type == "text" else ""
        external = bool(re.match(r"^([a-z][a-z0-9+.-]*:|//)", href, re.IGNORECASE))
        return f" ({html.escape(href)})" if external and href != text and href != f"mailto:{text}" else ""

    def heading_open(tokens, idx, options, env):  # a chunk's headings are bold lines, not page-sized
        return "<p><strong>"

    def heading_close(tokens, idx, options, env):
        return "</strong></p>\n"

    rules.update(image=image, link_open=link_open, link_close=link_close,
                 heading_open=heading_open, heading_close=heading_close)
    return parser


_MARKDOWN = _parser()


def _finish(fragment: str) -> str:
    """Allow-list sanitise, then make the result one inert HTML block (see the module doc)."""
    safe = nh3.clean(fragment, tags=ALLOWED_TAGS, attributes={}, url_schemes=set(), link_rel=None,
                     strip_comments=True)
    out, in_pre = [], 0
    for part in _TAG.split(safe):
        if part.startswith("<"):
            name = part.strip("</>").split()[0].lower() if part.strip("</>") else ""
            if name == "pre":
                in_pre += -1 if part.startswith("</") else 1
            out.append(part)
        else:
            text = part.translate(_INERT)
            out.append(text.replace("\n", "&#10;") if in_pre else text.replace("\n", " "))
    return f"<div>{''.join(out).strip()}</div>"


def render_markdown(text: str | None) -> str:
    """Markdown from a user, a document or the model, as inert HTML."""
    return _finish(_MARKDOWN.render(clean_text(text or "")))


def render_plain(text: str | None) -> str:
    """Text shown as it is (a file name, a message), as inert HTML."""
    return _finish(f"<p>{html.escape(clean_text(text or ''), quote=False)}</p>")


def render_list(lines: list[str]) -> str:
    if not lines:
        return ""
    return _finish("<ul>" + "".join(f"<li>{html.escape(clean_text(line), quote=False)}</li>" for line in lines) + "</ul>")


def render_sources(sources: list[dict[str, Any]], attributed: bool = False) -> str:
    """The sources panel: each retrieved chunk with its document, place, score and whether the
    answer cited it; uploads are marked as such."""
    if not sources:
        return render_plain("No sources for this answer.")
    parts = []
    if attributed:
        parts.append("<p><em>Citations were added by ragtune from matching text; the model wrote none.</em></p>")
    for s in sources:
        title = s["title"]
        section = s.get("section") or ""
        if section.startswith(title + " > "):
            section = section[len(title) + 3:]  # the heading path repeats the title
        where = f", page {s['page']}" if s.get("page") else (f" — {section}" if section and section != title else "")
        upload = uploaded_name(s["source"])
        shown_source = f"upload: {upload}" if upload else s["source"]
        mark = "<strong>cited</strong>" if s.get("cited") else "not cited"
        if s.get("superseded_by"):
            mark += f" · <em>superseded by {html.escape(clean_text(str(s['superseded_by'])), quote=False)}</em>"
        preview = s["text"] if len(s["text"]) <= SOURCE_PREVIEW_CHARS else s["text"][:SOURCE_PREVIEW_CHARS] + " …"
        escape = lambda v: html.escape(clean_text(str(v)), quote=False)  # noqa: E731
        # The exact sentences the answer rests on, highlighted, above the chunk they come from.
        evidence = "".join(f"<p>Evidence: <mark>{escape(unit)}</mark></p>" for unit in s.get("evidence") or [])
        parts.append(
            f"<p><strong>[{int(s['n'])}] {escape(title)}</strong>{escape(where)}<br>"
            f"<code>{escape(shown_source)}</code> · score {float(s['score']):.2f} · {mark}"
            f"{' · <em>uploaded document</em>' if upload else ''}</p>{evidence}"
            f"<blockquote>{_MARKDOWN.render(clean_text(preview))}</blockquote>"
        )
    return _finish("".join(parts))
