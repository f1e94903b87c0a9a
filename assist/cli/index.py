"""``assist index``: build and query the retrieval store the ``rag`` strategy reads.

::

    assist index add DIR_OR_FILES... --store PATH [--chunk-chars N] [--overlap N]
                                     [--embedder minilm|hashing] [--no-embed]
    assist index search QUERY --store PATH [-k 5] [--mode hybrid|bm25|dense]
    assist index stats --store PATH

``--store`` defaults to ``$ASSIST_RAG_STORE`` (:data:`strategies.rag.STORE_ENV`), the same
default the strategy uses. ``add`` reads and chunks every file before it opens the store, so
a bad path or a bad JSONL line ends in one line on stderr, exit 2, and nothing written; it
is resumable: chunks already stored with the same text are skipped. ``assist.cli`` mounts
this with :func:`add_parser`; ``python -m assist.cli.index index ...`` runs it alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assist.cli._flags import add_flags, int_at_least, opt, standalone
from assist.errors import AssistError, BadRequest

__all__ = ["IndexAdd", "IndexSearch", "IndexStats", "add_parser", "main"]


class _Usage(BadRequest):
    """A missing flag noticed after parsing (the store may come from the environment)."""


def _store_env() -> str:
    from strategies.rag import STORE_ENV

    return STORE_ENV


def _modes() -> tuple[str, ...]:
    from strategies import MODES

    return MODES


def _store(**kw: Any) -> Any:
    return opt(None, lambda: f"the store file (default: ${_store_env()})", **kw)


@dataclass
class IndexAdd:
    paths: list[str] = opt(default_factory=list, help="", positional=True, nargs="+",
                           metavar="DIR_OR_FILE")
    store: str | None = _store()
    chunk_chars: int = opt(1000, "largest chunk in characters", type=int_at_least(1))
    overlap: int | None = opt(None, "characters repeated between neighbouring chunks "
                                    "(default: chunk-chars/10)", type=int_at_least(0))
    embedder: str | None = opt(None, "minilm (all-MiniLM-L6-v2, semantic) or hashing (lexical, "
                                     "no model); default: the store's own, minilm for a new store",
                               choices=("minilm", "hashing"))
    no_embed: bool = opt(False, "store text only: BM25 at once, vectors made on first dense search")


@dataclass
class IndexSearch:
    query: str = opt(help="", positional=True)
    store: str | None = _store()
    k: int = opt(5, "how many chunks", type=int_at_least(1), flags=("-k",))
    mode: str = opt("hybrid", "how to rank: BM25, dense vectors, or both fused", choices=_modes)


@dataclass
class IndexStats:
    store: str | None = _store()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``index`` and its subcommands on ``assist``'s subparsers; each leaf sets
    ``func`` to a handler that takes the parsed args and returns an exit code."""
    index = subparsers.add_parser("index", help="build and query the rag strategy's document store")
    sub = index.add_subparsers(dest="index_command", required=True, metavar="{add,search,stats}")
    for name, help_line, config, func in (
            ("add", "chunk and index .txt/.md/.jsonl files (resumable)", IndexAdd, _add),
            ("search", "show the best chunks for a query", IndexSearch, _search),
            ("stats", "count the store's chunks and say what embedded them", IndexStats, _stats)):
        p = sub.add_parser(name, help=help_line)
        add_flags(p, config)
        p.set_defaults(func=func)
    return index


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"assist index {args.index_command}: {message}", file=sys.stderr)
    return 2


def _need_store(args: argparse.Namespace) -> Path | None:
    store = args.store or os.environ.get(_store_env())
    return Path(store) if store else None


def _add(args: argparse.Namespace) -> int:
    from strategies import DocumentStore, embedder_by_name, load_chunks

    store_path = _need_store(args)
    if store_path is None:
        return _fail(args, f"--store is required (or set ${_store_env()})")
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
    except AssistError as exc:
        if new:  # a store that failed on its first batch holds nothing: leave no file behind
            for path in (store_path, *(store_path.with_name(store_path.name + s)
                                       for s in ("-wal", "-shm"))):
                path.unlink(missing_ok=True)
        return _fail(args, exc.message)
    except KeyboardInterrupt:
        print("assist index add: interrupted; finished batches are kept, run it again to go on",
              file=sys.stderr)
        return 130
    print(f"{len(chunks)} chunks from {len(args.paths)} path(s): {stats.added} added, "
          f"{stats.updated} updated, {stats.skipped} unchanged, {stats.embedded} embedded; "
          f"{total} in {store_path}")
    return 0


def _open(args: argparse.Namespace) -> Any:
    from strategies import DocumentStore

    store_path = _need_store(args)
    if store_path is None:
        raise _Usage(f"--store is required (or set ${_store_env()})")
    return DocumentStore(store_path, embedder=getattr(args, "embedder_override", None),
                         create=False)


def _search(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _open(args) as store:  # a missing or bad store: one line from assist.cli, exit 2
        hits = store.search(args.query, k=args.k, mode=args.mode)
        sources = {h.id: (c.source if (c := store.get(h.id)) else "") for h in hits}
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
    with _open(args) as store:
        stats = store.stats()
    for key in ("path", "chunks", "embedded", "sources", "embedder", "dim", "bytes"):
        print(f"{key:>9}: {stats[key] if stats[key] is not None else '-'}")
    return 0


def main(argv: Sequence[str] | None = None, *, embedder: Any = None) -> int:
    """``assist index ...`` on its own; ``embedder`` overrides the store's (for tests)."""
    return standalone(add_parser, argv, embedder_override=embedder)


if __name__ == "__main__":
    sys.exit(main())
