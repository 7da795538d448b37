"""Output folders that appear whole or not at all, and the small file helpers around them.

Every command here writes into a hidden staging folder beside its target and renames it into
place only when everything inside is written, so a crash, Ctrl-C or bad record never leaves a
half-written adapter or data set behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# One error type for bad input everywhere (the Q/A loader in core raises it too).
from core.jsonl import MAX_LISTED_PROBLEMS, InputError, raise_problems  # noqa: F401  (re-exported)


class OutputExistsError(FileExistsError):
    """The target folder exists and --force was not given."""


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; a bad line fails naming file:line."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open("r", encoding="utf-8-sig") as handle:
        try:
            lines = list(enumerate(handle, start=1))
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    for number, line in lines:
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def refuse_existing(target: Path, force: bool) -> None:
    """Fail before any work is done, not after a 25-minute training run."""
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists; pass --force to replace it")


@contextmanager
def staged_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``target`` in one rename."""
    refuse_existing(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-staging-", dir=target.parent))
    try:
        yield staging
        refuse_existing(target, force)  # someone may have written it while we worked
        if target.exists():
            # Two renames and a delete: the old folder is gone only once the new one is in place.
            retired = target.with_name(f".{target.name}-retired-{uuid.uuid4().hex[:8]}")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """One JSON object per line, keys sorted, so identical inputs give identical bytes."""
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    return count


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")
