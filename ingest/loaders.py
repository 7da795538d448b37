"""Files -> ``SourceDocument``s: one loader per format, failures reported, never raised.

A SourceDocument is the unit ingest tracks (hash, add/change/remove): a file, or one record of
a ``.jsonl`` file. Its ``parts`` are LangChain Documents (PDF pages, Markdown sections, CSV
rows) that carry ``page`` / ``section`` metadata down to the chunks.

LangChain loaders are used where they keep the structure (PyPDFLoader for pages, CSVLoader for
rows, MarkdownHeaderTextSplitter for sections). HTML and DOCX are turned into Markdown here:
HTMLHeaderTextSplitter drops inline text (``<p>a <b>b</b></p>`` comes out split) and
Docx2txtLoader loses the headings, and both are a few lines with BeautifulSoup / python-docx.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.documents import Document

from core.jsonl import json_lines
from core.settings import IngestSettings

_MD_HEADERS = [("#", "h1"), ("##", "h2"), ("###", "h3")]
_TEXT_SNIFF_BYTES = 8192


@dataclass
class SourceDocument:
    doc_id: str  # stable key: the file's absolute path, or "<path>#<record id>" for JSONL
    source_file: str  # absolute path of the file it came from (prune works per file)
    source: str  # the path shown to people (relative to the working folder when inside it)
    title: str
    content_hash: str
    parts: list[Document] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # metadata for every chunk (JSONL fields)


@dataclass(frozen=True)
class LoadFailure:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class _Refused(Exception):
    """A file this loader cannot take; the message is the reason shown to the user."""


def display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- discovery -----------------------------------------------------------------------------
IGNORE_FILE = ".ragtuneignore"


def _ignored_patterns(root: Path) -> list[str]:
    """Glob patterns (relative to ``root``) from its .ragtuneignore: e.g. ``qa/`` or ``*.draft.md``."""
    file = root / IGNORE_FILE
    if not file.is_file():
        return []
    lines = (line.strip() for line in file.read_text(encoding="utf-8").splitlines())
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


def _is_ignored(relative: Path, patterns: list[str]) -> bool:
    parts = relative.as_posix()
    return any(fnmatch.fnmatch(parts, p) or fnmatch.fnmatch(parts, f"{p}/*") for p in patterns)


def discover(paths: list[Path], settings: IngestSettings) -> tuple[list[Path], list[LoadFailure]]:
    """Files under ``paths`` with a supported extension, following symlinks without looping.

    A folder given on the command line may hold a ``.ragtuneignore`` of glob patterns to skip
    (the demo keeps its Q/A sets beside the documents they ask about, not in the index).
    """
    files: list[Path] = []
    failures: list[LoadFailure] = []
    allowed = {e.lower() for e in settings.extensions}
    for root in paths:
        if not root.exists() and not root.is_symlink():
            failures.append(LoadFailure(str(root), "no such file or folder"))
            continue
        try:
            real_root = root.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            failures.append(LoadFailure(str(root), f"cannot resolve path ({exc})"))
            continue
        if real_root.is_file():
            if real_root.suffix.lower() in allowed:
                files.append(real_root)
            else:
                failures.append(LoadFailure(str(root), f"unsupported file type {real_root.suffix or '(none)'}"))
            continue
        visited: set[Path] = set()
        ignored = _ignored_patterns(real_root)
        for dirpath, dirnames, filenames in os.walk(real_root, followlinks=True):
            real_dir = Path(dirpath).resolve()
            if real_dir in visited:  # a symlink back up the tree
                dirnames[:] = []
                failures.append(LoadFailure(dirpath, "symlink loop: folder already visited"))
                continue
            visited.add(real_dir)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                if path.suffix.lower() not in allowed or _is_ignored(path.relative_to(real_root), ignored):
                    continue
                try:
                    files.append(path.resolve(strict=True))
                except (OSError, RuntimeError) as exc:
                    failures.append(LoadFailure(str(path), f"cannot resolve path ({exc})"))
    unique = sorted(set(files))
    return unique, failures


# -- loading -------------------------------------------------------------------------------
def pipeline_fingerprint(settings: IngestSettings, chunker_id: str) -> str:
    """Part of every document hash: a change of chunking or field options re-indexes."""
    options = {
        "chunker": chunker_id,
        "text": settings.jsonl_text_field,
        "id": settings.jsonl_id_field,
        "title": settings.jsonl_title_field,
        "loader_version": 1,
    }
    return json.dumps(options, sort_keys=True)


def load_file(path: Path, settings: IngestSettings, fingerprint: str) -> Iterator[SourceDocument | LoadFailure]:
    """Yield the file's documents, or a LoadFailure naming the file (and line) and the reason."""
    shown = display_path(path)
    try:
        size = path.stat().st_size
        if size > settings.max_file_mb * 1024 * 1024:
            raise _Refused(
                f"file is {size / 1024 / 1024:.1f} MB, over the ingest.max_file_mb limit of {settings.max_file_mb:g} MB"
            )
        if size == 0:
            raise _Refused("file is empty")
        raw = path.read_bytes()
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _load_jsonl(path, shown, raw, settings, fingerprint)
            return
        doc_hash = _hash(raw, fingerprint)
        extra_meta: dict[str, Any] = {}
        if suffix == ".pdf":
            title, parts = _load_pdf(path)
        elif suffix == ".docx":
            title, parts = _load_docx(path)
        else:
            text = _decode_text(raw)
            if suffix in {".md", ".markdown", ".txt"}:
                front, text = front_matter(text)
                extra_meta = front
            if suffix in {".md", ".markdown"}:
                title, parts = _load_markdown(text)
            elif suffix in {".html", ".htm"}:
                title, parts = _load_html(text)
            elif suffix == ".csv":
                title, parts = None, _load_csv(path)
            else:
                title, parts = None, [Document(page_content=text)]
        parts = [p for p in parts if p.page_content.strip()]
        if not parts:
            raise _Refused("no text could be extracted (a scanned PDF needs OCR first)")
        yield SourceDocument(
            doc_id=str(path),
            source_file=str(path),
            source=shown,
            title=title or path.stem.replace("-", " ").replace("_", " "),
            content_hash=doc_hash,
            parts=parts,
            extra=extra_meta,
        )
    except _Refused as exc:
        yield LoadFailure(shown, str(exc))
    except (OSError, RuntimeError) as exc:
        yield LoadFailure(shown, f"cannot read file ({exc.__class__.__name__}: {exc})")
    except Exception as exc:  # a parser's own error on a malformed file: report, keep going
        yield LoadFailure(shown, f"cannot parse {path.suffix} file ({exc.__class__.__name__}: {exc})")


_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*\n", re.DOTALL)
FRONT_MATTER_FIELDS = ("supersedes", "version", "effective")


def front_matter(text: str) -> tuple[dict[str, Any], str]:
    """A leading YAML block (``---`` lines) of a Markdown or text file: the fields ragtune uses
    (``supersedes``: the path, relative to the knowledge base, of a document this one replaces, or
    a list of them; ``version``; ``effective``: a date) and the text without it."""
    import yaml

    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise _Refused(f"front matter is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise _Refused("front matter must be a mapping of fields (e.g. supersedes: policies/old.md)")
    kept: dict[str, Any] = {}
    supersedes = data.get("supersedes")
    if supersedes is not None:
        items = [supersedes] if isinstance(supersedes, str) else supersedes
        if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
            raise _Refused("front matter field 'supersedes' must be a document path or a list of paths")
        kept["supersedes"] = [i.strip() for i in items]
    for name in ("version", "effective"):
        if data.get(name) is not None:
            kept[name] = str(data[name])
    return kept, text[match.end():]


def _hash(raw: bytes, fingerprint: str) -> str:
    return hashlib.sha256(fingerprint.encode() + b"\0" + raw).hexdigest()


def _decode_text(raw: bytes) -> str:
    if b"\0" in raw[:_TEXT_SNIFF_BYTES]:
        raise _Refused("binary content (NUL bytes) in a text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Refused(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it, e.g. iconv -f cp1252 -t utf-8"
        ) from None


def _markdown_parts(text: str) -> tuple[str | None, list[Document]]:
    from langchain_text_splitters import MarkdownHeaderTextSplitter

    splitter = MarkdownHeaderTextSplitter(_MD_HEADERS, strip_headers=False)
    parts = []
    title = None
    for section in splitter.split_text(text):
        headings = [section.metadata[k] for _, k in _MD_HEADERS if k in section.metadata]
        title = title or section.metadata.get("h1")
        parts.append(Document(page_content=section.page_content, metadata={"section": " > ".join(headings)}))
    return title, parts


def _load_markdown(text: str) -> tuple[str | None, list[Document]]:
    return _markdown_parts(text)


def _load_html(text: str) -> tuple[str | None, list[Document]]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")
    page_title = soup.title.get_text(" ", strip=True) if soup.title else None
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    for heading in soup.find_all(re.compile(r"^h[1-6]$")):
        level = min(int(heading.name[1]), 3)
        heading.replace_with(f"\n\n{'#' * level} {heading.get_text(' ', strip=True)}\n\n")
    for block in soup.find_all(["p", "div", "li", "tr", "br", "section", "article", "table", "ul", "ol"]):
        block.insert_after("\n")
    body = re.sub(r"\n\s*\n+", "\n\n", soup.get_text())
    title, parts = _markdown_parts(body.strip())
    return page_title or title, parts


def _load_pdf(path: Path) -> tuple[str | None, list[Document]]:
    from langchain_community.document_loaders import PyPDFLoader

    pages = PyPDFLoader(str(path)).load()
    parts = [
        Document(page_content=p.page_content, metadata={"page": int(p.metadata.get("page", i)) + 1})
        for i, p in enumerate(pages)
    ]
    title = next((p.metadata.get("title") for p in pages if p.metadata.get("title")), None)
    return title, parts


def _load_docx(path: Path) -> tuple[str | None, list[Document]]:
    import docx

    document = docx.Document(str(path))
    lines = []
    for paragraph in document.paragraphs:
        style = paragraph.style.name if paragraph.style is not None else ""
        level = re.match(r"Heading (\d)", style or "")
        text = paragraph.text.strip()
        if not text:
            continue
        lines.append(f"{'#' * min(int(level.group(1)), 3)} {text}" if level else text)
        if style == "Title":
            lines[-1] = f"# {text}"
    for table in document.tables:
        for row in table.rows:
            lines.append(" | ".join(cell.text.strip() for cell in row.cells))
    title, parts = _markdown_parts("\n\n".join(lines))
    return document.core_properties.title or title, parts


def _load_csv(path: Path) -> list[Document]:
    from langchain_community.document_loaders import CSVLoader

    rows = CSVLoader(str(path), encoding="utf-8-sig").load()
    return [Document(page_content=r.page_content, metadata={"row": int(r.metadata.get("row", i)) + 1})
            for i, r in enumerate(rows)]


def _load_jsonl(
    path: Path, shown: str, raw: bytes, settings: IngestSettings, fingerprint: str
) -> Iterator[SourceDocument | LoadFailure]:
    text = _decode_text(raw)
    text_field, id_field, title_field = settings.jsonl_text_field, settings.jsonl_id_field, settings.jsonl_title_field
    seen_ids: set[str] = set()
    for line in json_lines(text):
        number, record = line.number, line.record
        where = f"{shown}:{number}"
        if record is None:
            yield LoadFailure(where, str(line.problem))
            continue
        body = record.get(text_field)
        if isinstance(body, list):
            body = "\n\n".join(str(x) for x in body if x is not None)
        if not isinstance(body, str) or not body.strip():
            yield LoadFailure(where, f"no text in field {text_field!r} (choose it with --text-field)")
            continue
        record_id = str(record.get(id_field, f"line-{number}"))
        if record_id in seen_ids:
            yield LoadFailure(where, f"duplicate {id_field!r} {record_id!r}; the first record with it was kept")
            continue
        seen_ids.add(record_id)
        extra = {
            k: v for k, v in record.items()
            if k != text_field and (isinstance(v, (str, int, float, bool)) or (
                isinstance(v, list) and all(isinstance(x, (str, int, float, bool)) for x in v)))
        }
        extra["record_id"] = record_id
        title = record.get(title_field)
        yield SourceDocument(
            doc_id=f"{path}#{record_id}",
            source_file=str(path),
            source=f"{shown}#{record_id}",
            title=str(title) if title else f"{path.stem} {record_id}",
            content_hash=_hash(json.dumps(record, sort_keys=True).encode(), fingerprint),
            parts=[Document(page_content=body)],
            extra=extra,
        )
