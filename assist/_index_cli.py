"""``assist index``: build and query the retrieval store the ``rag`` strategy reads.

::

    assist index add DIR_OR_FILES... --store PATH [--chunk-chars N] [--overlap N]
                                     [--embedder minilm|hashing] [--no-embed]
    assist index search QUERY --store PATH [-k 5] [--mode hybrid|bm25|dense]
    assist index stats --store PATH

``--store`` defaults to ``$ASSIST_RAG_STORE``, the same default the strategy uses. ``add``
reads and chunks every file before it opens the store, so a bad path or a bad JSONL line
ends in one line on stderr, exit 2, and nothing written; it is resumable: chunks already
stored with the same text are skipped. ``assist.cli`` mounts this with
:func:`add_index_parser`; ``python -m assist._index_cli index ...`` runs it alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from assist._argtypes import int_at_least, standalone

__all__ = ["add_index_parser", "main"]

STORE_ENV = "ASSIST_RAG_STORE"
# strategies._store.MODES, spelt out: importing the store here would slow `assist --help`.
MODES = ("hybrid", "bm25", "dense")


class _Usage(Exception):
    """A missing flag noticed after parsing (the store may come from the environment)."""


def _store_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=os.environ.get(STORE_ENV),
                   help=f"the store file (default: ${STORE_ENV})")


def add_index_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``index`` and its subcommands on ``assist``'s subparsers; each leaf sets
    ``func`` to a handler that takes the parsed args and returns an exit code."""
    index = subparsers.add_parser("index", help="build and query the rag strategy's document store")
    sub = index.add_subparsers(dest="index_command", required=True, metavar="{add,search,stats}")
    a = sub.add_parser("add", help="chunk and index .txt/.md/.jsonl files (resumable)")
    a.add_argument("paths", nargs="+", metavar="DIR_OR_FILE")
    _store_flag(a)
    a.add_argument("--chunk-chars", type=int_at_least(1), default=1000,
                   help="largest chunk in characters (default: 1000)")
    a.add_argument("--overlap", type=int_at_least(0), default=None,
                   help="characters repeated between neighbouring chunks (default: chunk-chars/10)")
    a.add_argument("--embedder", choices=("minilm", "hashing"), default=None,
                   help="minilm (all-MiniLM-L6-v2, semantic) or hashing (lexical, no model); "
                        "default: the store's own, minilm for a new store")
    a.add_argument("--no-embed", action="store_true",
                   help="store text only: BM25 at once, vectors made on first dense search")
    a.set_defaults(func=_add)
    s = sub.add_parser("search", help="show the best chunks for a query")
    s.add_argument("query")
    _store_flag(s)
    s.add_argument("-k", type=int_at_least(1), default=5, help="how many chunks (default: 5)")
    s.add_argument("--mode", choices=MODES, default="hybrid", help="default: hybrid")
    s.set_defaults(func=_search)
    t = sub.add_parser("stats", help="count the store's chunks and say what embedded them")
    _store_flag(t)
    t.set_defaults(func=_stats)
    return index


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"assist index {args.index_command}: {message}", file=sys.stderr)
    return 2


def _need_store(args: argparse.Namespace) -> Path | None:
    return Path(args.store) if args.store else None


def _add(args: argparse.Namespace) -> int:
    from strategies._embed import EmbedderError, embedder_by_name
    from strategies._ingest import IngestError, load_chunks
    from strategies._store import DocumentStore, StoreError

    store_path = _need_store(args)
    if store_path is None:
        return _fail(args, f"--store is required (or set ${STORE_ENV})")
    overlap = args.chunk_chars // 10 if args.overlap is None else args.overlap
    if overlap > args.chunk_chars // 2:
        return _fail(args, f"--overlap {overlap} is over half of --chunk-chars {args.chunk_chars}")
    new = not store_path.exists()
    try:
        chunks = load_chunks(args.paths, args.chunk_chars, overlap)  # everything, before writing
        embedder = getattr(args, "embedder_override", None) or (
            embedder_by_name(args.embedder) if args.embedder else None)
        with DocumentStore(store_path, embedder=embedder) as store:
            stats = store.add(chunks, embed=not args.no_embed)
            total = len(store)
    except (IngestError, StoreError, EmbedderError) as exc:
        if new:  # a store that failed on its first batch holds nothing: leave no file behind
            for path in (store_path, *(store_path.with_name(store_path.name + s)
                                       for s in ("-wal", "-shm"))):
                path.unlink(missing_ok=True)
        return _fail(args, str(exc))
    except KeyboardInterrupt:
        print("assist index add: interrupted; finished batches are kept, run it again to go on",
              file=sys.stderr)
        return 130
    print(f"{len(chunks)} chunks from {len(args.paths)} path(s): {stats.added} added, "
          f"{stats.updated} updated, {stats.skipped} unchanged, {stats.embedded} embedded; "
          f"{total} in {store_path}")
    return 0


def _open(args: argparse.Namespace) -> Any:
    from strategies._store import DocumentStore

    store_path = _need_store(args)
    if store_path is None:
        raise _Usage(f"--store is required (or set ${STORE_ENV})")
    return DocumentStore(store_path, embedder=getattr(args, "embedder_override", None),
                         create=False)


def _search(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from strategies._embed import EmbedderError
    from strategies._store import StoreError

    try:
        with _open(args) as store:
            hits = store.search(args.query, k=args.k, mode=args.mode)
            sources = {h.id: (c.source if (c := store.get(h.id)) else "") for h in hits}
    except (_Usage, StoreError, EmbedderError) as exc:
        return _fail(args, str(exc))
    table = Table(title=f"{args.mode} search: {args.query}")
    for col in ("#", "id", "score", "source", "text"):
        table.add_column(col, justify="right" if col in ("#", "score") else "left",
                         overflow="fold" if col == "text" else "ellipsis")
    for rank, hit in enumerate(hits, start=1):
        text = " ".join(hit.text.split())  # one row per hit: paragraphs joined
        text = text if len(text) <= 200 else text[:199] + "…"
        table.add_row(str(rank), hit.id, f"{hit.score:.4f}", sources[hit.id], text)
    Console(width=max(100, Console().width)).print(table)
    if not hits:
        print("no matches")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from strategies._store import StoreError

    try:
        with _open(args) as store:
            stats = store.stats()
    except (_Usage, StoreError) as exc:
        return _fail(args, str(exc))
    for key in ("path", "chunks", "embedded", "sources", "embedder", "dim", "bytes"):
        print(f"{key:>9}: {stats[key] if stats[key] is not None else '-'}")
    return 0


def main(argv: Sequence[str] | None = None, *, embedder: Any = None) -> int:
    """``assist index ...`` on its own; ``embedder`` overrides the store's (for tests)."""
    return standalone(add_index_parser, argv, embedder_override=embedder)


if __name__ == "__main__":
    sys.exit(main())
