"""A persistent document store for retrieval: SQLite with FTS5 (BM25) plus dense vectors.

One SQLite file holds everything: the ``chunks`` table (id, text, source, metadata JSON,
text hash, embedding as a float32 BLOB), an external-content FTS5 index over the text
kept in sync by triggers, and a ``meta`` table recording which embedder made the vectors
(vectors from two different embedders are not comparable, so a mismatch is refused).

Dense search is brute-force cosine over the whole matrix, loaded once into numpy and
cached until the store changes: 100k chunks x 384 dims is 150 MB and a ~10 ms matmul, so
an approximate index would buy nothing at this size. Hybrid search fuses the BM25 and
dense rankings with reciprocal rank fusion (RRF, k=60), which needs no score calibration
between the two retrievers.

The embedder is any ``Callable[[list[str]], np.ndarray]`` with an optional ``name``; the
default is all-MiniLM-L6-v2, loaded lazily so BM25-only use never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from assist.errors import BadRequest
from assist.prompts import Passage
from strategies._embed import Embedder, embedder_by_name, embedder_name

__all__ = ["MODES", "RRF_K", "AddStats", "Chunk", "DocumentStore", "Mode", "StoreError",
           "fts_query", "rrf"]

Mode = Literal["hybrid", "bm25", "dense"]
MODES: tuple[str, ...] = ("hybrid", "bm25", "dense")
RRF_K = 60  # the constant of Cormack et al. (2009); damps the weight of the very top ranks
_PROGRESS_OVER = 512  # chunks to embed before a progress bar is worth drawing
_TOKEN = re.compile(r"\w+")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id TEXT PRIMARY KEY, text TEXT NOT NULL, source TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}', hash TEXT NOT NULL, embedding BLOB);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='rowid', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_au AFTER UPDATE OF text ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text);
END;
"""


class StoreError(BadRequest):
    """A store that is missing, unreadable or built with another embedder."""


@dataclass(frozen=True)
class Chunk:
    """A stored unit of text: a stable id, the text, where it came from, free metadata."""

    id: str
    text: str
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class AddStats:
    added: int = 0
    updated: int = 0  # text, source or metadata changed
    skipped: int = 0  # same id and text hash: nothing to do (what makes re-indexing resumable)
    embedded: int = 0


def fts_query(text: str, max_terms: int = 64) -> str | None:
    """An FTS5 MATCH expression any user text is safe in: each word quoted, OR-ed.

    Quoting makes operators (``AND``, ``NEAR``, ``*``, ``"``, ``col:``) plain terms, and OR
    lets BM25 rank partial matches instead of demanding every word of a question.
    """
    terms = list(dict.fromkeys(t.lower() for t in _TOKEN.findall(text)))[:max_terms]
    return " OR ".join(f'"{t}"' for t in terms) or None


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: ``sum 1 / (k + rank)`` over the lists (ranks from 1).

    Ties keep first-seen order, so the result is deterministic.
    """
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])  # sorted() is stable


def _as_chunk(item: Chunk | Passage | Sequence[Any]) -> Chunk:
    if isinstance(item, Chunk):
        return item
    if isinstance(item, Passage):
        return Chunk(item.id, item.text)
    if isinstance(item, Sequence) and not isinstance(item, str) and 2 <= len(item) <= 4:
        return Chunk(*item)
    raise TypeError(f"cannot store {item!r}: expected a Chunk, Passage or (id, text[, source])")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class DocumentStore:
    """Chunks in one SQLite file, searchable by BM25, dense cosine, or both fused.

    ``create=False`` refuses a path with no store (what readers want: a typo must not
    silently search an empty new store). Thread-safe: one lock around the connection, so
    an async strategy may search from a worker thread.
    """

    def __init__(self, path: str | Path, embedder: Embedder | None = None,
                 create: bool = True, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        create = create and not read_only
        if self.path.is_dir():
            raise StoreError(f"store {self.path} is a folder, not a store file")
        if not create and not self.path.is_file():
            raise StoreError(f"no document store at {self.path} (build one with `assist index add`)")
        if create and not self.path.parent.is_dir():
            raise StoreError(f"cannot create store {self.path}: folder {self.path.parent} "
                             "does not exist")
        self._embedder = embedder
        self._lock = threading.RLock()
        self._writes = 0  # our own commits; PRAGMA data_version counts everyone else's
        self._dense: tuple[tuple[int, int], list[str], np.ndarray] | None = None
        try:
            if read_only:  # nothing is created, converted or migrated: a store, or an error
                uri = self.path.resolve().as_uri() + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
                tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
                if not {"meta", "chunks", "chunks_fts"} <= tables:
                    self._db.close()
                    raise StoreError(f"{self.path} is not a document store (no chunks table)")
            else:
                self._db = sqlite3.connect(self.path, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")  # readers keep going while `index add` runs
                self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a document store ({exc})") from exc

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DocumentStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def __repr__(self) -> str:
        return f"DocumentStore({str(self.path)!r})"

    # -- the embedder ------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def embedder_name(self) -> str | None:
        """The embedder that made this store's vectors (None before the first vector)."""
        with self._lock:
            return self._meta("embedder")

    def _get_embedder(self) -> Embedder:
        """The injected embedder, else the one the store was built with, else MiniLM."""
        recorded = self._meta("embedder")
        if self._embedder is None:
            try:
                self._embedder = embedder_by_name(recorded or "all-MiniLM-L6-v2")
            except ValueError as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc
        name = embedder_name(self._embedder)
        if recorded is not None and recorded != name:
            raise StoreError(f"store {self.path} was embedded with {recorded!r}, not {name!r}; "
                             "use that embedder or index into a new store")
        return self._embedder

    def _embed(self, texts: list[str]) -> np.ndarray:
        embedder = self._get_embedder()
        vectors = np.asarray(embedder(texts), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise StoreError(f"embedder returned shape {vectors.shape} for {len(texts)} texts")
        dim = self._meta("dim")
        if dim is not None and int(dim) != vectors.shape[1]:
            raise StoreError(f"embedder gives {vectors.shape[1]}-d vectors; store has {dim}-d")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1.0, norms)  # cosine becomes a dot product

    def _record_embedder(self, dim: int) -> None:
        name = embedder_name(self._get_embedder())
        self._db.executemany("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)",
                             [("embedder", name), ("dim", str(dim))])

    # -- writing -----------------------------------------------------------------------
    def add(self, items: Iterable[Chunk | Passage | Sequence[Any]], *, embed: bool = True,
            batch_size: int = 256, progress: bool | None = None) -> AddStats:
        """Upsert chunks; unchanged ones (same id, same text hash) are skipped.

        ``embed=False`` stores text only (BM25 works at once; dense search embeds the rest
        on first use). Each batch commits on its own, so an interrupted add keeps what it
        finished and a re-run picks up from there.
        """
        latest = {c.id: c for c in map(_as_chunk, items)}  # a repeated id: the last one wins
        stats = AddStats()
        with self._lock:
            known: dict[str, tuple[str, str, str, bool]] = {}
            ids = list(latest)
            for i in range(0, len(ids), 500):  # under SQLite's bound-parameter limit
                part = ids[i:i + 500]
                rows = self._db.execute(
                    "SELECT id, hash, source, metadata, embedding IS NOT NULL FROM chunks "
                    f"WHERE id IN ({','.join('?' * len(part))})", part)
                known.update({r[0]: (r[1], r[2], r[3], bool(r[4])) for r in rows})
            todo: list[tuple[Chunk, bool]] = []  # (chunk, needs a new vector)
            for chunk in latest.values():
                old = known.get(chunk.id)
                meta = json.dumps(chunk.metadata, sort_keys=True)
                same_text = old is not None and old[0] == _digest(chunk.text)
                if old is None:
                    stats.added += 1
                elif not same_text or old[1:3] != (chunk.source, meta):
                    stats.updated += 1
                elif not (embed and not old[3]):  # else: unchanged, but still without a vector
                    stats.skipped += 1
                    continue
                todo.append((chunk, embed and not (same_text and old is not None and old[3])))
            stats.embedded = self._write(todo, batch_size, progress)
        return stats

    def _write(self, todo: list[tuple[Chunk, bool]], batch_size: int,
               progress: bool | None) -> int:
        """Upsert in committed batches; a vector is made only where the flag says so (a
        metadata-only change keeps its old vector)."""
        total = sum(flag for _, flag in todo)
        with _Progress(total, "embedding", progress) as bar:
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                texts = [c.text for c, flag in batch if flag]
                vectors = self._embed(texts) if texts else None
                made = iter(vectors if vectors is not None else ())
                blobs = [next(made).tobytes() if flag else None for _, flag in batch]
                with self._db:  # one transaction per batch
                    if vectors is not None:
                        self._record_embedder(vectors.shape[1])
                    self._db.executemany(
                        "INSERT INTO chunks(id, text, source, metadata, hash, embedding) "
                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                        "text = excluded.text, source = excluded.source, "
                        "metadata = excluded.metadata, hash = excluded.hash, "
                        "embedding = coalesce(excluded.embedding, "
                        "  CASE WHEN chunks.hash = excluded.hash THEN chunks.embedding END)",
                        [(c.id, c.text, c.source, json.dumps(c.metadata, sort_keys=True),
                          _digest(c.text), blob) for (c, _), blob in zip(batch, blobs, strict=True)])
                self._writes += 1
                bar.advance(len(texts))
        return total

    def embed_missing(self, batch_size: int = 256, progress: bool | None = None) -> int:
        """Embed chunks stored with ``embed=False``; returns how many it embedded."""
        with self._lock:
            rows = self._db.execute("SELECT id, text, source, metadata FROM chunks "
                                    "WHERE embedding IS NULL ORDER BY rowid").fetchall()
            todo = [(Chunk(r[0], r[1], r[2], json.loads(r[3])), True) for r in rows]
            return self._write(todo, batch_size, progress)

    def warm(self) -> None:
        """Load now what the first dense search would load (the embedder, the matrix), so
        that no request pays for it (the server calls this once, at start)."""
        with self._lock:
            ids, _ = self._matrix()
            if ids:
                self._embed(["warm up"])

    # -- reading -----------------------------------------------------------------------
    def get(self, chunk_id: str) -> Chunk | None:
        with self._lock:
            row = self._db.execute("SELECT id, text, source, metadata FROM chunks WHERE id = ?",
                                   (chunk_id,)).fetchone()
        return None if row is None else Chunk(row[0], row[1], row[2], json.loads(row[3]))

    def search(self, query: str, k: int = 5, mode: Mode | str = "hybrid") -> list[Passage]:
        """The ``k`` best passages for ``query``; scores are BM25 (higher is better),
        cosine, or the fused RRF score, by mode."""
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r} (known: {', '.join(MODES)})")
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        with self._lock:
            if mode == "bm25":
                return self._bm25(query, k)
            if mode == "dense":
                return self._dense_search(query, k)
            depth = max(50, 4 * k)  # fuse deeper lists than asked: RRF rewards agreement
            lists = [self._bm25(query, depth), self._dense_search(query, depth)]
            texts = {p.id: p.text for ranking in lists for p in ranking}
            fused = rrf([[p.id for p in ranking] for ranking in lists])
            return [Passage(doc, texts[doc], score) for doc, score in fused[:k]]

    def _bm25(self, query: str, k: int) -> list[Passage]:
        match = fts_query(query)
        if match is None:
            return []
        rows = self._db.execute(
            "SELECT c.id, c.text, bm25(chunks_fts) AS s FROM chunks_fts "
            "JOIN chunks c ON c.rowid = chunks_fts.rowid WHERE chunks_fts MATCH ? "
            "ORDER BY s, c.rowid LIMIT ?", (match, k)).fetchall()
        return [Passage(r[0], r[1], -float(r[2])) for r in rows]  # FTS5's bm25: lower is better

    def _matrix(self) -> tuple[list[str], np.ndarray]:
        if not self.read_only and self._db.execute(
                "SELECT 1 FROM chunks WHERE embedding IS NULL LIMIT 1").fetchone():
            self.embed_missing()
        version = (self._writes, int(self._db.execute("PRAGMA data_version").fetchone()[0]))
        if self._dense is None or self._dense[0] != version:
            # Read-only: chunks stored without a vector are found by BM25 alone.
            rows = self._db.execute("SELECT id, embedding FROM chunks WHERE embedding IS NOT NULL "
                                    "ORDER BY rowid").fetchall()
            dim = int(self._meta("dim") or 0)
            matrix = (np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
                      .reshape(len(rows), dim) if rows else np.zeros((0, dim), np.float32))
            self._dense = (version, [r[0] for r in rows], matrix)
        return self._dense[1], self._dense[2]

    def _dense_search(self, query: str, k: int) -> list[Passage]:
        ids, matrix = self._matrix()
        if not ids or not query.strip():
            return []
        vector = self._embed([query])[0]
        if not vector.any():  # nothing embeddable (say, only punctuation): no dense evidence
            return []
        scores = matrix @ vector
        top = np.argsort(-scores, kind="stable")[:k]  # stable: ties keep insertion order
        texts = dict(self._db.execute(
            f"SELECT id, text FROM chunks WHERE id IN ({','.join('?' * len(top))})",
            [ids[i] for i in top]).fetchall())
        return [Passage(ids[i], texts[ids[i]], float(scores[i])) for i in top]

    def stats(self) -> dict[str, Any]:
        wal = self.path.with_name(self.path.name + "-wal")
        with self._lock:
            n, embedded, sources = self._db.execute(
                "SELECT count(*), count(embedding), count(DISTINCT source) FROM chunks").fetchone()
            return {"path": str(self.path), "chunks": n, "embedded": embedded, "sources": sources,
                    "embedder": self._meta("embedder"), "dim": self._meta("dim"),
                    "bytes": sum(p.stat().st_size for p in (self.path, wal) if p.is_file())}


class _Progress:
    """A rich progress bar on stderr, drawn only for big jobs (or when asked)."""

    def __init__(self, total: int, label: str, show: bool | None) -> None:
        self._bar: Any = None
        if total and (show or (show is None and total > _PROGRESS_OVER)):
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task(label, total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

