"""Turn files into chunks for the document store: ``.txt``, ``.md`` and ``.jsonl``.

Ids are stable so re-indexing is resumable and citations survive a rebuild: a text or
markdown file's chunks are ``<name>#<n>``, where ``<name>`` is the file's path relative
to the folder given on the command line, *including that folder's name*
(``docs/guide/intro.md#0``), or the bare file name for a file given directly. Neither
depends on the directory the command runs from.

Chunking packs paragraphs (blank-line separated) greedily up to ``max_chars``; a chunk
that follows another in the same section starts with the last ``overlap`` characters of
it, cut at a word boundary, so a fact split across the seam is whole in one of them. A
paragraph longer than ``max_chars`` is cut at whitespace with the same overlap. In
markdown each heading starts a new chunk (and is recorded as metadata), and fenced code
blocks are never split at their blank lines.

JSONL: one object a line with ``text`` (required), optional ``id`` and ``source``; other
keys become metadata. A record that fits in ``max_chars`` keeps its id (``kb-17``); a
longer one becomes ``<id>#<n>``. A bad line is an :class:`IngestError` naming
``file:line``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from assist.errors import BadRequest
from strategies._embed import Embedder
from strategies._store import Chunk, DocumentStore

__all__ = ["SUFFIXES", "IngestError", "chunk_text", "iter_files", "load_chunks",
           "store_from_facts"]

SUFFIXES = (".txt", ".md", ".jsonl")
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")


class IngestError(BadRequest):
    """A path or a record that cannot be indexed; the message names the file (and line)."""


def iter_files(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str]]:
    """``(file, name)`` for every supported file under ``paths``, in sorted order; ``name``
    is the stable id prefix. Hidden files and folders are skipped in folder walks."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            root = path.resolve().name
            found = False
            for file in sorted(path.rglob("*")):
                rel = file.relative_to(path)
                if (file.is_file() and file.suffix in SUFFIXES
                        and not any(part.startswith(".") for part in rel.parts)):
                    found = True
                    yield file, (Path(root) / rel).as_posix()
            if not found:
                raise IngestError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise IngestError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
            yield path, path.name
        else:
            raise IngestError(f"{path}: no such file or folder")


def chunk_text(text: str, max_chars: int = 1000, overlap: int = 100,
               markdown: bool = False) -> list[tuple[str, str | None]]:
    """``(chunk, heading)`` pairs: paragraphs packed up to ``max_chars`` with ``overlap``."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, not {max_chars}")
    if not 0 <= overlap <= max_chars // 2:  # more would make each chunk mostly repetition
        raise ValueError(f"overlap must be between 0 and max_chars/2 ({max_chars // 2}), "
                         f"not {overlap}")
    out: list[tuple[str, str | None]] = []
    for heading, paragraphs in _sections(text, markdown):
        out += [(chunk, heading) for chunk in _pack(paragraphs, max_chars, overlap)]
    return out


def _sections(text: str, markdown: bool) -> list[tuple[str | None, list[str]]]:
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    lines: list[str] = []
    fenced = False

    def flush() -> None:
        paragraph = "\n".join(lines).strip()
        if paragraph:
            sections[-1][1].append(paragraph)
        lines.clear()

    for line in text.splitlines():
        if markdown and line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        heading = _HEADING.match(line) if markdown and not fenced else None
        if heading:
            flush()
            sections.append((heading.group(1).strip(), []))
            lines.append(line)
        elif not line.strip() and not fenced:
            flush()
        else:
            lines.append(line)
    flush()
    return [s for s in sections if s[1]]


def _tail(text: str, n: int) -> str:
    """The last ``n`` characters of ``text``, starting at a word boundary."""
    if n <= 0:
        return ""
    if len(text) <= n:
        return text
    tail = text[-n:]
    if not text[-n - 1].isspace():
        space = re.search(r"\s", tail)
        tail = tail[space.end():] if space else ""
    return tail.strip()


def _split_long(text: str, max_chars: int, overlap: int) -> list[str]:
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):  # cut at the last whitespace that fits, if there is one
            cut = max(text.rfind(" ", start + 1, end + 1), text.rfind("\n", start + 1, end + 1))
            end = cut if cut > start else end
        pieces.append(text[start:end].strip())
        if end >= len(text):
            break
        nxt = end - overlap
        if nxt <= start or overlap == 0:
            nxt = end
        elif not text[nxt - 1].isspace():  # start the overlap on a word, not inside one
            space = re.search(r"\s", text[nxt:end])
            nxt = nxt + space.end() if space else end
        while nxt < len(text) and text[nxt].isspace():
            nxt += 1
        start = nxt
    return [p for p in pieces if p]


def _pack(paragraphs: list[str], max_chars: int, overlap: int) -> list[str]:
    chunks: list[str] = []
    current = ""
    for paragraph in paragraphs:
        if current and len(current) + 2 + len(paragraph) <= max_chars:
            current = f"{current}\n\n{paragraph}"
            continue
        tail = ""
        if current:
            chunks.append(current)
            tail = _tail(current, overlap)
        # The overlap always leads; what overflows is cut with the same overlap inside.
        text = f"{tail}\n\n{paragraph}" if tail else paragraph
        pieces = _split_long(text, max_chars, overlap) if len(text) > max_chars else [text]
        chunks += pieces[:-1]
        current = pieces[-1]
    if current:
        chunks.append(current)
    return chunks


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"{path}: cannot read as UTF-8 text ({exc})") from exc


def _jsonl_chunks(path: Path, name: str, max_chars: int,
                  overlap: int) -> Iterator[tuple[Chunk, str]]:
    for lineno, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IngestError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise IngestError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise IngestError(f'{where}: "text" must be a non-empty string')
        base = record.get("id", f"{name}#{lineno}")
        source = record.get("source", name)
        for key, value in (("id", base), ("source", source)):
            if not isinstance(value, str) or not value.strip():
                raise IngestError(f'{where}: "{key}" must be a non-empty string')
        metadata: dict[str, Any] = {k: v for k, v in record.items()
                                    if k not in ("id", "text", "source")}
        metadata["line"] = lineno
        parts = [(text.strip(), None)] if len(text) <= max_chars else chunk_text(
            text, max_chars, overlap)
        for n, (part, _) in enumerate(parts):
            chunk_id = base if len(parts) == 1 else f"{base}#{n}"
            yield Chunk(chunk_id, part, source, metadata), where


def load_chunks(paths: Iterable[str | Path], max_chars: int = 1000,
                overlap: int = 100) -> list[Chunk]:
    """Every chunk of every file, all read and checked before anything is written."""
    chunks: list[Chunk] = []
    first: dict[str, str] = {}  # id -> where it came from, to name both ends of a clash
    for path, name in iter_files(paths):
        if path.suffix == ".jsonl":
            found = list(_jsonl_chunks(path, name, max_chars, overlap))
        else:
            pieces = chunk_text(_read(path), max_chars, overlap, markdown=path.suffix == ".md")
            found = [(Chunk(f"{name}#{n}", text, name, {"heading": heading} if heading else {}),
                      str(path)) for n, (text, heading) in enumerate(pieces)]
        for chunk, where in found:
            if chunk.id in first:
                raise IngestError(f"{where}: duplicate id {chunk.id!r} (first in {first[chunk.id]})")
            first[chunk.id] = where
            chunks.append(chunk)
    return chunks


def store_from_facts(task: Any, path: str | Path, embedder: Embedder | None = None,
                     embed: bool = True) -> DocumentStore:
    """A store holding the facts task's passages under their own ids (``kb-N``), the ids
    the assistant learned to cite. ``task`` is an ``evals.tasks.FactsTask``."""
    store = DocumentStore(path, embedder=embedder)
    seen = {e.id: e.seen for e in task.entities}
    store.add((Chunk(pid, text, "facts", {"seen": seen[pid]}) for pid, text in task.passages()),
              embed=embed)
    return store
