"""python -m ingest migrate: move an index made by qdrant-client's local mode into the embedded store.

ragtune used to keep its index in qdrant-client's local mode (a folder with meta.json and
collection/). The embedded store is now Qdrant Edge, in the same place (qdrant.path, default
<data_dir>/qdrant). This command moves every collection there, point by point: the same ids, the
same payloads (each chunk gets its scope: "public", or its uploader's for an upload), the stored
vectors as the named vector "dense", and a BM25 vector from the chunk's text. When the
collection's recorded embedder is not embedding.model (or it has none), the chunks are embedded
again with embedding.model instead of copied.

Nothing is dropped: the old folder is first renamed aside to <path>.local-mode, a collection is
switched on only once all its points are written and counted, and the old folder is renamed to
<path>.local-mode-migrated (delete it when satisfied) only when every collection is done. An
interrupted migration is finished by running the command again.

Examples:
  python -m ingest migrate                         # data/qdrant (local mode) -> data/qdrant (Qdrant Edge)
  python -m ingest migrate --dry-run               # what would be moved
  python -m ingest migrate --set data_dir=/srv/ragtune
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.logs import setup_logging
from core.cli import add_settings_options, cli_settings
from core.settings import Settings
from core.store import DENSE, METADATA_KEY, SCOPE_KEY, StoreError, StorePoint, store_backend
from core.store_edge import EdgeStore, is_local_mode_folder

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

    from core.embeddings import Embedder, EmbedderInfo

log = logging.getLogger("ingest.migrate")

_BATCH = 256
ASIDE_SUFFIX = ".local-mode"
DONE_SUFFIX = ".local-mode-migrated"


@dataclass
class Moved:
    collection: str
    points: int
    reembedded: bool


@dataclass
class MigrationReport:
    source: Path
    moved: list[Moved] = field(default_factory=list)
    kept_at: Path | None = None

    def lines(self) -> list[str]:
        out = [f"moved {m.collection}: {m.points} points ({'re-embedded with embedding.model' if m.reembedded else 'vectors copied'})"
               for m in self.moved]
        if self.kept_at:
            out.append(f"the old local-mode folder is kept at {self.kept_at}; delete it when satisfied")
        return out


def _collections(client: "QdrantClient") -> dict[str, str]:
    """Logical name -> physical collection, as the old store's aliases say (plain ones as they are)."""
    names = {c.name for c in client.get_collections().collections}
    aliased = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
    behind_alias = set(aliased.values())
    return aliased | {n: n for n in names if n not in behind_alias and n not in aliased}


def _recorded(client: "QdrantClient", physical: str) -> "EmbedderInfo | None":
    from core.embeddings import EmbedderInfo

    record = (client.get_collection(physical).config.metadata or {}).get("ragtune")
    if not record:
        return None
    return EmbedderInfo(name=record["embedder"], dimension=int(record["dimension"]), max_tokens=0)


def migrate(settings: Settings, embedder: "Embedder | None" = None, *, dry_run: bool = False,
            progress: bool = False) -> MigrationReport:
    """Move every collection of the local-mode folder at qdrant.path into Qdrant Edge there."""
    from qdrant_client import QdrantClient

    if store_backend(settings) != "edge":
        raise StoreError("python -m ingest migrate moves a local-mode folder into the embedded store "
                         "(qdrant.backend=edge); unset qdrant.url")
    target = Path(settings.qdrant_location)
    aside = target.with_name(target.name + ASIDE_SUFFIX)
    if is_local_mode_folder(target):
        if aside.exists():
            raise StoreError(f"both {target} and {aside} hold a local-mode index; keep the one to migrate "
                             f"and move the other away")
        source = target
    elif is_local_mode_folder(aside):
        source = aside  # an interrupted migration: finish it
    else:
        raise StoreError(f"no index made by qdrant-client local mode at {target} (a folder with meta.json "
                         "and collection/): nothing to migrate")
    report = MigrationReport(source=source)
    if dry_run:
        client = QdrantClient(path=str(source))
        try:
            for name, physical in sorted(_collections(client).items()):
                count = client.count(physical, exact=True).count
                report.moved.append(Moved(name, count, reembedded=False))
        finally:
            client.close()
        return report

    if source is target:
        target.rename(aside)  # the old folder stays whole until everything is moved
        source = aside
    try:
        client = QdrantClient(path=str(source))
    except RuntimeError as exc:
        raise StoreError(f"the old index {source} is in use by another process ({exc}); stop it (the chat app) first") from exc
    try:
        for name, physical in sorted(_collections(client).items()):
            report.moved.append(_move(client, name, physical, target, settings, embedder, progress))
    finally:
        client.close()
    done = source.with_name(target.name + DONE_SUFFIX)
    source.rename(done)
    report.kept_at = done
    return report


def _move(client: "QdrantClient", name: str, physical: str, target: Path, settings: Settings,
          embedder: "Embedder | None", progress: bool) -> Moved:
    from tqdm.auto import tqdm

    from ingest.chunking import payload_embed_text
    from ingest.uploads import scope_of_source

    recorded = _recorded(client, physical)
    if embedder is None:
        from core.embeddings import load_embedder

        embedder = load_embedder(settings.embedding)
    reembed = recorded is None or (recorded.name, recorded.dimension) != (embedder.info.name, embedder.info.dimension)
    total = client.count(physical, exact=True).count
    store = EdgeStore.open(str(target), name)
    try:
        store.drop_orphans()  # a generation an interrupted migration left unfinished
        if store.exists() and store.count() == total:
            log.info("%s was moved by an earlier run, which stopped before renaming the old folder", name)
            return Moved(name, total, reembed)
        if store.exists() and store.count() > 0:
            raise StoreError(f"the embedded store already has a collection {name!r} with {store.count()} points; "
                             "move it away or migrate into another qdrant.path")
        generation = store.create_physical(embedder.info)
        offset = None
        written = 0
        with tqdm(total=total, unit="point", desc=f"migrating {name}", disable=not progress) as bar:
            while True:
                records, offset = client.scroll(physical, limit=_BATCH, offset=offset, with_payload=True,
                                                with_vectors=not reembed)
                if records:
                    texts = [payload_embed_text(r.payload or {}) for r in records]
                    vectors = (embedder.embeddings.embed_documents(texts) if reembed
                               else [_dense_of(r.vector) for r in records])
                    points = [StorePoint(str(r.id), {DENSE: v}, text, _with_scope(r.payload or {}, scope_of_source))
                              for r, v, text in zip(records, vectors, texts)]
                    store.upsert(generation, points)
                    written += len(points)
                    bar.update(len(points))
                if offset is None:
                    break
        store.point_alias_at(generation)
        store.optimize()
        if store.count() != total:
            raise StoreError(f"migrating {name!r}: {store.count()} points arrived of {total}; the old folder is "
                             "kept, run python -m ingest migrate again")
        log.info("migrated %s: %d points", name, written)
    finally:
        store.close()
    return Moved(name, total, reembed)


def _dense_of(vector: Any) -> list[float]:
    if isinstance(vector, dict):  # a named vector
        vector = vector.get(DENSE, vector.get("", next(iter(vector.values()))))
    return list(vector)


def _with_scope(payload: dict[str, Any], scope_of_source: Any) -> dict[str, Any]:
    meta = dict(payload.get(METADATA_KEY) or {})
    meta.setdefault(SCOPE_KEY, scope_of_source(str(meta.get("source_file") or meta.get("source") or "")))
    return {**payload, METADATA_KEY: meta}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest migrate", description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="list the collections and points that would move")
    add_settings_options(parser, "qdrant.path=/srv/index")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    settings = cli_settings(args)
    setup_logging(settings.log_level)
    try:
        report = migrate(settings, dry_run=args.dry_run, progress=sys.stderr.isatty())
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(("would be " if args.dry_run else "") + line)
    return 0
