"""Documents added from the chat page: checked, stored by owner and content, indexed crash-safely.

The Gradio callback only calls ``UploadService.add``; everything else is here.

- **What is accepted**: only files Gradio itself received in an upload (the caller passes that
  test as ``received``; a client-supplied server path is never read), of an accepted type,
  neither empty nor over ``chat.upload_max_mb``. A refused file touches nothing.
- **Where it is stored**: ``<uploads_dir>/<owner digest>/<sha256 of content>/<clean name>``. Two
  users' ``notes.md`` are two documents; two same-named files in one upload are two documents;
  the same file uploaded twice is one (unchanged). The indexer's document id is that path, so
  the index and the files always agree: a file the indexer could not read is deleted again.
- **Crash safety**: the indexer writes a document's new points before deleting old ones (as for
  the CLI). A kill during an upload can still leave part of a new document indexed, so each
  upload is journaled (``<uploads_dir>/in-flight/<id>.json``, written before any file is copied)
  and ``recover()`` at start keeps each journaled document whose chunks are all stored and
  rolls back the others (file deleted, points pruned): no partial upload is ever retrieved
  after a restart. Files are copied under a hidden name, flushed and renamed into place, so a
  stored file is never a partial one.
- **Owner and scope**: each upload's chunks carry ``metadata.scope = scope_for(owner)``
  (the knowledge base an operator ingests is ``public``); the chat retrieves with
  ``readable_scopes(owner)``, so an upload is found by its owner only (a payload index in the store).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.store import PUBLIC_SCOPE
from core.text import clean_filename

if TYPE_CHECKING:
    from core.settings import Settings
    from ingest.indexer import Indexer

log = logging.getLogger(__name__)

JOURNAL_DIR = "in-flight"
_OWNER_DIGEST_CHARS = 32
# <owner digest>/<sha256>/<name>: how an uploaded document's path is recognised, wherever the
# uploads folder is and however the path is shown (relative or absolute).
_UPLOADED = re.compile(r"(?:^|[/\\])([0-9a-f]{32})[/\\][0-9a-f]{64}[/\\]([^/\\#]+)$")


def uploaded_name(source: str) -> str | None:
    """The original (cleaned) name when ``source`` is an uploaded document's path, else None."""
    match = _UPLOADED.search(source or "")
    return match.group(2) if match else None


def scope_of_source(source: str) -> str:
    """The scope a stored document belongs in, from its path (migration: points written before
    scopes existed): its uploader's for an upload, else the shared knowledge base."""
    match = _UPLOADED.search(source or "")
    return f"owner:{match.group(1)}" if match else PUBLIC_SCOPE


def owner_digest(owner: str) -> str:
    return hashlib.sha256(owner.encode("utf-8")).hexdigest()[:_OWNER_DIGEST_CHARS]


def readable_scopes(owner: str) -> list[str]:
    """What ``owner`` may retrieve: the shared knowledge base and their own uploads."""
    return [PUBLIC_SCOPE, UploadService.scope_for(owner)]


@dataclass
class UploadOutcome:
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "name: reason"
    failed: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return ([f"refused {r}" for r in self.refused] + [f"added {a}" for a in self.added]
                + [f"unchanged {u}" for u in self.unchanged] + [f"failed {f}" for f in self.failed])


@dataclass
class _Accepted:
    name: str
    source: Path
    destination: Path
    existed: bool


class UploadService:
    def __init__(self, settings: "Settings", indexer: "Indexer"):
        self.chat = settings.chat
        self.auth = settings.server.auth
        self.indexer = indexer
        self.root = settings.uploads_dir.expanduser().absolute()
        self.journal = self.root / JOURNAL_DIR
        self._lock = threading.Lock()  # one upload at a time: the index sees one writer

    # -- policy ----------------------------------------------------------------------------
    def may_upload(self, signed_in: bool) -> bool:
        return signed_in or self.chat.anonymous_uploads

    @staticmethod
    def scope_for(owner: str) -> str:
        """The retrieval scope of an owner's uploads (the knowledge base is the shared scope)."""
        return f"owner:{owner_digest(owner)}"

    # -- adding ----------------------------------------------------------------------------
    def add(self, owner: str, files: list[Path], received: Callable[[Path], bool], *, signed_in: bool) -> UploadOutcome:
        outcome = UploadOutcome()
        if not files:
            return outcome
        if not self.may_upload(signed_in):
            outcome.refused.append("all files: adding documents needs sign-in on this server")
            return outcome
        accepted = self._check(owner, files, received, outcome)
        if not accepted:
            return outcome
        with self._lock:
            entry = self._journal_write(owner, [a.destination for a in accepted])
            try:
                for item in accepted:
                    if not item.existed:
                        _store(item.source, item.destination)
                report = self.indexer.run([a.destination for a in accepted], progress=False,
                                          scope=self.scope_for(owner),  # only its owner retrieves it
                                          on_event=lambda m: log.info("upload by %s: %s", owner_digest(owner), m))
            except BaseException:
                # Nothing half-done may stay: roll back what this upload created, then re-raise.
                self._roll_back([a.destination for a in accepted if not a.existed])
                self._journal_remove(entry)
                raise
            failed = {os.path.realpath(f.path): f.reason for f in report.failed}
            unchanged = {os.path.realpath(s) for s in report.unchanged}
            for item in accepted:
                stored_as = os.path.realpath(item.destination)
                if stored_as in failed:
                    if not item.existed:
                        self._roll_back([item.destination])  # stored files and the index agree
                    outcome.failed.append(f"{item.name}: {failed[stored_as]}")
                elif stored_as in unchanged:
                    outcome.unchanged.append(item.name)
                else:
                    outcome.added.append(item.name)
            self._journal_remove(entry)
        return outcome

    def _check(self, owner: str, files: list[Path], received: Callable[[Path], bool],
               outcome: UploadOutcome) -> list[_Accepted]:
        accepted: list[_Accepted] = []
        limit = self.chat.upload_max_mb
        for file in files:
            file = Path(file)
            name = clean_filename(file.name)
            if not received(file) or not file.is_file() or file.is_symlink():
                outcome.refused.append(f"{name}: not a file received by this server in an upload")
                continue
            size = file.stat().st_size
            if file.suffix.lower() not in self.chat.upload_types:
                outcome.refused.append(f"{name}: type {file.suffix or '(none)'} is not accepted "
                                       f"({', '.join(self.chat.upload_types)})")
            elif size == 0:
                outcome.refused.append(f"{name}: the file is empty")
            elif size / 1024 / 1024 > limit:
                outcome.refused.append(f"{name}: {size / 1024 / 1024:.1f} MB is over the {limit:g} MB limit")
            else:
                digest = _sha256(file)
                destination = self.root / owner_digest(owner) / digest / name
                if any(a.destination == destination for a in accepted):
                    continue  # the very same file twice in one upload: one document
                accepted.append(_Accepted(name, file, destination, destination.is_file()))
        return accepted

    # -- recovery --------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """At start: finish or roll back every upload a crash interrupted. Returns what was done."""
        done: list[str] = []
        if not self.journal.is_dir():
            return done
        with self._lock:
            for entry in sorted(self.journal.glob("*.json")):
                try:
                    paths = [Path(p) for p in json.loads(entry.read_text(encoding="utf-8"))["paths"]]
                except (OSError, ValueError, KeyError, TypeError):
                    log.warning("unreadable upload journal entry %s: removed", entry)
                    entry.unlink(missing_ok=True)
                    continue
                for path in paths:
                    if path.is_file() and self._complete(path):
                        done.append(f"kept {path.name} (its upload was indexed completely before the stop)")
                    else:
                        self._roll_back([path])
                        done.append(f"rolled back {path.name} (its upload was interrupted)")
                        log.warning("rolled back the interrupted upload of %s", path)
                self._journal_remove(entry)
        return done

    def _complete(self, path: Path) -> bool:
        report = self.indexer.run([path], dry_run=True, progress=False)
        return bool(report.unchanged) and not (report.added or report.changed or report.failed)

    def _roll_back(self, paths: list[Path]) -> None:
        """Delete the files and every point stored for them (the indexer prunes a folder's
        documents whose files are gone)."""
        for path in paths:
            folder = path.parent
            for leftover in (path, folder / f".{path.name}.partial"):
                leftover.unlink(missing_ok=True)
            if folder.is_dir():
                self.indexer.run([folder], prune=True, progress=False)
                _remove_empty(folder, stop=self.root)

    # -- the journal -----------------------------------------------------------------------
    def _journal_write(self, owner: str, paths: list[Path]) -> Path:
        self.journal.mkdir(parents=True, exist_ok=True)
        entry = self.journal / f"{uuid.uuid4().hex}.json"
        record = {"owner": owner_digest(owner), "paths": [str(p) for p in paths], "started": time.time()}
        _write_durably(entry, json.dumps(record).encode("utf-8"))
        return entry

    @staticmethod
    def _journal_remove(entry: Path) -> None:
        entry.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _store(source: Path, destination: Path) -> None:
    """Copy under a hidden name (discover skips it), flush, rename into place: never a partial file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.parent / f".{destination.name}.partial"
    with source.open("rb") as reader, partial.open("wb") as writer:
        shutil.copyfileobj(reader, writer)
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(partial, destination)


def _write_durably(path: Path, data: bytes) -> None:
    partial = path.with_suffix(".partial")
    with partial.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself survives a power cut
    finally:
        os.close(descriptor)


def _remove_empty(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
