"""The per-question records of a run: one JSON line each, appended and flushed as it is made.

A crash or Ctrl-C loses at most the question being answered; ``--resume`` reads the file back,
skips the (mode, question id) pairs already in it, and appends the rest. A line cut short by a
crash (the only way a line can be incomplete) is dropped when the file is reopened.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RecordLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self.dropped = 0

    def load(self) -> "RecordLog":
        """Read the records written so far, and rewrite the file without a truncated last line."""
        if not self.path.is_file():
            return self
        kept: list[str] = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self.dropped += 1
                continue
            self.records.append(record)
            kept.append(line)
        if self.dropped:
            log.warning("%s: dropped %d incomplete line(s) left by an interrupted run", self.path, self.dropped)
            staging = self.path.with_suffix(".tmp")
            staging.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            staging.replace(self.path)
        return self

    def done(self) -> set[tuple[str, str]]:
        return {(r["mode"], r["id"]) for r in self.records}

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the next question starts
        self.records.append(record)
