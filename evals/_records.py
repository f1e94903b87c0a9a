"""What an eval's out folder holds, and who may write it.

- ``samples.jsonl``: one record per (task, strategy, item), appended one whole line per
  ``os.write``; every rewrite (dropping a torn tail, compacting superseded records) goes
  through a temporary file, ``fsync`` and ``os.replace``, so no crash loses a finished record.
- ``.lock``: an exclusive ``flock`` held for the whole run; a second writer fails at once.
- ``identity.json``: what the records were computed from; ``resume`` with another identity
  is refused, naming the key that differs.

Split from :mod:`evals.harness` so the harness reads as "run the items" and this module as
"keep the records".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console

from evals._config import EvalError
from evals.tasks import Sample, Task

__all__ = ["IDENTITY", "LOCK", "SAMPLES", "ErrorStats", "Finished", "Key", "Record", "append_line", "claim",
           "error_stats", "locked", "replace_atomically", "retryable",
           "pending", "read_records", "run_identity"]

SAMPLES = "samples.jsonl"
IDENTITY = "identity.json"
LOCK = ".lock"
Record = dict[str, Any]
Key = tuple[str, str, str]


# -- samples.jsonl -------------------------------------------------------------------------
def _key(record: Mapping[str, Any]) -> Key:
    return str(record["task"]), str(record["strategy"]), str(record["item"])


def _final(record: Mapping[str, Any]) -> bool:
    """Whether a record is finished work: it has runs and none of them errored. An errored
    run (the model, the transport or the strategy raised) says nothing about the answer, so
    ``resume`` runs it again instead of counting it as wrong for good."""
    runs = record.get("runs") or []
    return bool(runs) and not any(retryable(run) for run in runs)


def retryable(run: Mapping[str, Any]) -> bool:
    """Whether a run errored in a way another try may not repeat (the server, the transport).
    A refusal the model will always give — the strategy's conversation outgrew the context,
    say — is recorded with ``retry: false``: a wrong answer for good, not an error."""
    return run.get("error") is not None and bool(run.get("retry", True))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file beside it, fsynced, then
    ``os.replace``. A crash at any point leaves either the old file or the new one whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def append_line(fd: int, line: str) -> None:
    """One record line, whole, with a single ``os.write`` on an ``O_APPEND`` file (looping
    only on a short write). A kill can tear at most this last line, which ``read_records``
    drops; a line never interleaves with another (one writer holds the lock)."""
    data = line.encode("utf-8")
    while data:
        data = data[os.write(fd, data):]


def _read_lines(path: Path) -> list[tuple[Record, str]]:
    """(record, its line) for each line of ``samples.jsonl``; a torn last line is dropped and
    cut from the file (atomically), so appending starts on a fresh line."""
    original = path.read_text(encoding="utf-8")
    lines = original.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out: list[tuple[Record, str]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            _key(record)
        except (ValueError, KeyError, TypeError) as exc:
            if i == last:
                break
            raise EvalError(f"{path}:{i + 1}: not a sample record ({exc}); "
                            "remove the line to resume") from exc
        out.append((record, line))
    text = "".join(line + "\n" for _, line in out)
    if text != original:  # drop the torn tail, end on a newline
        try:
            replace_atomically(path, text)
        except OSError as exc:
            raise EvalError(f"{path}: cannot drop the torn last line ({exc}); the file is "
                            "unchanged") from exc
    return out


def read_records(path: Path) -> list[Record]:
    """The records of a ``samples.jsonl``, in file order (a later record of the same
    (task, strategy, item) supersedes an earlier one).

    A last line cut off mid-write (the run was killed) is dropped and cut from the file too,
    through an atomic rewrite; a bad line anywhere else is an EvalError naming
    ``file:line``, since silently dropping finished work would be worse.
    """
    return [record for record, _ in _read_lines(path)]


class Finished:
    """The records already in ``samples.jsonl``: the latest per key, and its line."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.records: dict[Key, Record] = {}
        self.lines: dict[Key, str] = {}
        self.on_disk = 0  # lines in the file, superseded ones included
        if not path.exists() or not path.stat().st_size:
            return
        if not resume:
            raise EvalError(f"{path} exists: pass --resume to continue that run, or another --out")
        entries = _read_lines(path)
        for record, line in entries:
            self.add(record, line)
        self.on_disk = len(entries)

    def add(self, record: Record, line: str) -> None:
        key = _key(record)
        self.records[key] = record
        self.lines[key] = line

    def final(self, key: Key) -> bool:
        return key in self.records and _final(self.records[key])


def pending(out: Path, task: Task, names: Sequence[str], items: Sequence[Sample], *,
            resume: bool) -> int:
    """How many (item, strategy) records ``evaluate`` would compute, errored ones included
    (so a caller can skip loading a model when a resumed run is complete); the same errors
    as ``evaluate``."""
    done = Finished(out / SAMPLES, resume)
    return sum(not done.final((task.name, name, item.id)) for item in items for name in names)


# -- who owns the folder, and what it holds --------------------------------------------------
_HELD: dict[str, list[int]] = {}  # realpath of a locked out folder -> [fd, holders] here
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``out`` (``out/.lock``, ``flock``, non-blocking).

    Another process (or another open of the file) holding it makes this an EvalError at
    once, naming the holder's pid. Re-entrant within one process, so the CLI can take it
    before setting up and ``evaluate`` again inside; the last holder here releases it. The
    kernel releases it when the process exits, however it dies, so a SIGKILLed run never
    leaves a stale lock. (``flock`` is local: two machines sharing ``out`` over NFS are not
    kept apart.)
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(out)
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            try:
                fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise EvalError(f"{out}: cannot create its lock file ({exc})") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise EvalError(f"{out} is in use by another eval (pid {holder}): wait for it to "
                                "finish, or give another --out") from exc
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            _HELD[key][1] -= 1
            if not _HELD[key][1]:
                os.close(_HELD.pop(key)[0])  # closing the only descriptor releases the flock


# What each identity key is called on the command line, for the message that refuses it.
_KEY_FLAGS = {
    "task": "task (--task)",
    "dataset": "test data (the task's settings: --task-config, --data-dir or the file's contents)",
    "scorer": "answer extractor (--extractor)",
    "model": "model (--model, or --base-url with --model-name)",
    "engine": "engine (--engine)",
    "strategies": "strategy set (--strategies)",
    "seed": "seed (--seed)",
    "samples": "runs per item (--samples)",
    "max_tokens": "token limit (--max-tokens)",
}


def _dataset_hash(task: Task, items: Sequence[Sample]) -> str:
    """A digest of the task's whole test split (ids, questions, answers): ``--limit`` may
    change on resume, the items behind an id may not."""
    try:
        samples = task.split("test")
    except Exception:  # noqa: BLE001 - a task without a finite test split: hash these items
        samples = list(items)
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.id, s.question, s.answer], ensure_ascii=False).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()[:16]


def run_identity(task: Task, strategies: Sequence[str], *, model: str, seed: int, samples: int,
                 items: Sequence[Sample] = (), **extra: Any) -> dict[str, Any]:
    """What a run's records depend on, as recorded in ``identity.json``: the task, a digest
    of its test data, its scorer, ``model``, the strategy set (sorted: order is only
    presentation), the base seed and K, plus any ``extra`` keys (the CLI adds ``engine`` and
    ``max_tokens``). ``--limit``, ``--concurrency`` and ``--baseline`` are not identity:
    they may change on resume."""
    extractor = getattr(task, "extractor", None)
    scorer = getattr(extractor, "__name__", None) or type(extractor).__name__
    return {"task": task.name, "dataset": _dataset_hash(task, items), "scorer": scorer,
            "model": model, "strategies": sorted(strategies), "seed": seed, "samples": samples,
            **extra}


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _difference(key: str, then: Any, now: Any) -> str:
    what = _KEY_FLAGS.get(key, key)
    if key == "strategies" and isinstance(then, list) and isinstance(now, list):
        added = [s for s in now if s not in then]
        missing = [s for s in then if s not in now]
        parts = ([f"adds {', '.join(added)}"] if added else []) + (
            [f"leaves out {', '.join(missing)}"] if missing else [])
        return f"another {what}: this one {' and '.join(parts)} (there: {', '.join(then)})"
    return f"another {what}: {_show(then)} there, {_show(now)} now"


def claim(out: Path, identity: Mapping[str, Any], *, resume: bool,
          console: Console | None = None) -> None:
    """Check that this run may write to ``out``, then record its identity there.

    Records already in ``out/samples.jsonl`` need ``resume`` and the same identity; the
    first key that differs is an EvalError naming it (and its flag). A folder written
    before identities were recorded is adopted with a warning. Call it holding
    :func:`locked`.
    """
    samples = out / SAMPLES
    has_records = samples.exists() and samples.stat().st_size > 0
    if has_records and not resume:
        raise EvalError(f"{samples} exists: pass --resume to continue that run, or another --out")
    for stale in out.glob(".*.tmp"):  # a rewrite killed midway; the lock says it is dead
        with contextlib.suppress(OSError):
            stale.unlink()
    path = out / IDENTITY
    saved: dict[str, Any] | None = None
    if path.exists():
        try:
            saved = dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise EvalError(f"{path}: not a run identity ({exc}); restore it or use another "
                            "--out") from exc
    now = json.loads(json.dumps(dict(identity), default=str))  # as it would read back
    if has_records:
        if saved is None:
            (console or Console(stderr=True)).print(
                f"[yellow]warning: {out} records no identity (written by an older version); "
                "adopting this run's task, model, strategies and seed unchecked[/yellow]")
        else:
            for key in [*saved, *(k for k in now if k not in saved)]:
                then_v, now_v = saved.get(key), now.get(key)
                if then_v != now_v:
                    raise EvalError(f"--resume: {out} holds a run with "
                                    f"{_difference(key, then_v, now_v)}; resume with the same "
                                    "settings, or give another --out")
    if saved != now:
        replace_atomically(path, json.dumps(now, indent=2, ensure_ascii=False) + "\n")


class ErrorStats(NamedTuple):
    runs: int
    errored_runs: int
    records: int  # (task, strategy, item) records
    errored_records: int  # records with an errored run (or none at all)
    items: int  # distinct items
    errored_items: int  # items with an errored record
    examples: list[str]  # distinct error messages, the first three

    @property
    def rate(self) -> float:
        """The share of runs that errored (0 when there are none)."""
        return self.errored_runs / self.runs if self.runs else 0.0


def error_stats(records: Sequence[Record]) -> ErrorStats:
    """How many runs, records and items of ``records`` errored, with a few of the messages."""
    runs = [run for rec in records for run in (rec.get("runs") or [{"error": "no runs"}])]
    errors = [str(run["error"]) for run in runs if retryable(run)]
    bad = [rec for rec in records if not _final(rec)]
    return ErrorStats(runs=len(runs), errored_runs=len(errors), records=len(records),
                      errored_records=len(bad), items=len({rec["item"] for rec in records}),
                      errored_items=len({rec["item"] for rec in bad}),
                      examples=list(dict.fromkeys(errors))[:3])
