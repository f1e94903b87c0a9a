"""The eval harness: every (item, strategy, run) of a task against one ChatModel.

Each (task, strategy, item) becomes one record in ``samples.jsonl``, appended and flushed
the moment all of its K runs are done, so a killed run loses only what was in flight and
``resume=True`` picks up after the last whole line::

    {"task", "strategy", "item", "question", "reference",
     "runs": [{"text", "answer", "correct", "finish_reason", "prompt_tokens",
               "completion_tokens", "calls", "latency_s", "error", "seed", "trace"}]}

``correct`` and ``answer`` are the *task's* scorer on the final text (what the summary
counts), not the strategy's own extraction. Run j of every strategy gets seed ``seed + j``
(on a per-run copy of the strategy, wherever it has a ``seed`` option), so runs differ and
re-running reproduces them. A strategy that raises on an item is recorded as an errored,
incorrect run; it never stops the evaluation, but it is not final either: ``resume=True``
runs every errored run again (same seed) and replaces the record.

The out folder is owned by one run at a time and belongs to one experiment:

- ``.lock``: an exclusive ``flock`` held for the whole run (a second writer fails at once
  with :class:`EvalError`; the kernel drops it when the holder dies, even by SIGKILL).
- ``identity.json``: what the records were computed from (task, its test data, scorer,
  model, strategy set, seed, K, ...). ``resume`` with another identity is an EvalError
  naming the key that differs, so records of two experiments are never mixed.
- ``samples.jsonl``: appended one whole line per ``os.write``; every rewrite (dropping a
  torn tail, compacting superseded records) writes a temporary file, fsyncs it and moves
  it over the old one with ``os.replace``, so no crash can lose a finished record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console

from assist._protocol import ChatModel, Messages
from assist.types import ChatCompletion
from evals._config import EvalError
from evals.tasks import Sample, Task
from strategies._base import nodes, with_fields

__all__ = ["IDENTITY", "LOCK", "SAMPLES", "ErrorStats", "Record", "claim", "error_stats",
           "evaluate", "length_warning", "locked", "nodes", "parse_strategies", "pending",
           "prepare_strategies", "read_records", "run_identity", "seeded", "with_fields"]

SAMPLES = "samples.jsonl"
IDENTITY = "identity.json"
LOCK = ".lock"
LENGTH_WARN = 0.05  # share of runs cut at max_tokens above which the numbers are suspect
Record = dict[str, Any]
Key = tuple[str, str, str]


# -- strategies ----------------------------------------------------------------------------
def parse_strategies(specs: Sequence[str]) -> dict[str, Any]:
    """``{spec: strategy}``; a bad spec raises SpecError (or EvalError) naming it."""
    import strategies

    out: dict[str, Any] = {}
    for spec in specs:
        try:
            out[spec] = strategies.parse(spec)
        except strategies.SpecError:
            raise
        except ValueError as exc:  # a factory's own check, e.g. rag's missing store file
            raise EvalError(f"strategy {spec!r}: {exc}") from exc
    return out


def seeded(strategy: Any, seed: int) -> Any:
    """``strategy`` with ``seed`` on every node that samples with one."""
    return with_fields(strategy, lambda node: {"seed": seed})


def prepare_strategies(
    strategies: Mapping[str, Any], task: Task, *, out: Path, model_path: Path | None = None,
    max_tokens: int | None = None, embedder: str = "auto", stack: contextlib.ExitStack,
    console: Console | None = None,
) -> dict[str, Any]:
    """The strategies made ready for ``task`` and the model, before any work.

    ``max_tokens`` goes to every node that has the option. A ``rag`` without a store (and
    no ``$ASSIST_RAG_STORE``) on ``facts`` gets the facts passages, indexed once into
    ``out/facts.sqlite`` (reused on resume); elsewhere it is an error. A ``bon`` without a
    reward model (and no ``$ASSIST_REWARD_MODEL``) gets the ``rm`` stage beside
    ``model_path`` (``runs/tiny/rlhf`` → ``runs/tiny/rm``).
    """
    from strategies import BestOfN, Retrieve

    every = [n for s in strategies.values() for n in nodes(s)]
    bare_rag = [n for n in every if isinstance(n, Retrieve) and n.store is None and n.search is None]
    bare_bon = [n for n in every if isinstance(n, BestOfN) and n.rm is None and n.scorer is None
                and not os.environ.get("ASSIST_REWARD_MODEL")]
    store, rm = None, None
    if bare_rag:
        from evals.tasks import FactsTask

        if not isinstance(task, FactsTask):
            raise EvalError(f"rag needs a document store on task {task.name}: give store=PATH "
                            "in its spec or set ASSIST_RAG_STORE (built automatically for facts)")
        store = stack.enter_context(_facts_store(task, out / "facts.sqlite", embedder,
                                                 console or Console(stderr=True)))
    if bare_bon:
        sibling = model_path.parent / "rm" if model_path is not None else None
        if sibling is None or not (sibling / "config.json").is_file():
            raise EvalError("bon needs a reward model: give rm=PATH in its spec or set "
                            "ASSIST_REWARD_MODEL (defaulted only for --model RUN/<stage> with "
                            "a RUN/rm beside it)")
        rm = str(sibling)

    def pick(node: Any) -> dict[str, Any]:
        changes: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
        if store is not None and any(node is n for n in bare_rag):
            changes["store"] = store
        if rm is not None and any(node is n for n in bare_bon):
            changes["rm"] = rm
        return changes

    return {name: with_fields(s, pick) for name, s in strategies.items()}


def _facts_store(task: Any, path: Path, embedder: str, console: Console) -> Any:
    """The facts passages in a store at ``path``; an existing one is topped up (resume)."""
    from strategies._embed import EmbedderError, HashingEmbedder, MiniLMEmbedder
    from strategies._ingest import store_from_facts
    from strategies._store import StoreError

    chosen: Any = None  # an existing store keeps the embedder it was built with
    if not path.exists():
        chosen = HashingEmbedder() if embedder == "hashing" else MiniLMEmbedder()
        if embedder == "auto":
            try:
                chosen(["probe"])  # loads the model now, so a broken install falls back
            except Exception as exc:  # noqa: BLE001 - any load failure means "use hashing"
                console.print(f"[yellow]rag: MiniLM did not load ({exc}); indexing facts "
                              "with the hashing embedder[/yellow]")
                chosen = HashingEmbedder()
    try:
        return store_from_facts(task, path, embedder=chosen)
    except (StoreError, EmbedderError) as exc:
        raise EvalError(f"rag: cannot build the facts store {path}: {exc}") from exc


# -- one run -------------------------------------------------------------------------------
class _Tap:
    """The ChatModel one run sees: forwards every call and keeps what the strategy's trace
    does not (each choice's finish reason, and usage even when the strategy raises)."""

    def __init__(self, model: ChatModel) -> None:
        self.model = model
        self.name = model.name
        self.choices: list[list[tuple[str, str]]] = []  # per call: (text, finish_reason)
        self.prompt_tokens = self.completion_tokens = self.calls = 0

    @property
    def supports_n(self) -> bool:  # read live: a remote model may find out it lacks n
        return self.model.supports_n

    async def chat(self, messages: Messages, **kwargs: Any) -> ChatCompletion:
        completion = await self.model.chat(messages, **kwargs)
        self.calls += 1
        self.prompt_tokens += completion.usage.prompt_tokens
        self.completion_tokens += completion.usage.completion_tokens
        self.choices.append([(c.message.content or "", str(c.finish_reason or "stop"))
                             for c in completion.choices])
        return completion

    def finish_reason(self, text: str, trace: Sequence[Mapping[str, Any]]) -> str:
        """The finish reason of the call that produced ``text``, else of the last call."""
        for entry in reversed(trace):
            if entry.get("finish_reason"):
                return str(entry["finish_reason"])
        for call in reversed(self.choices):
            for content, reason in call:
                if content == text:
                    return reason
        return self.choices[-1][0][1] if self.choices and self.choices[-1] else "stop"


async def _run_one(model: ChatModel, task: Task, item: Sample, strategy: Any, seed: int,
                   gate: asyncio.Semaphore) -> dict[str, Any]:
    tap = _Tap(model)
    messages = [{"role": "user", "content": item.question}]
    async with gate:
        t0 = time.perf_counter()
        try:
            result = await strategy.run(tap, messages)
        except Exception as exc:  # noqa: BLE001 - one item's failure is data, not a crash
            return {"text": "", "answer": None, "correct": False, "finish_reason": "error",
                    "prompt_tokens": tap.prompt_tokens, "completion_tokens": tap.completion_tokens,
                    "calls": tap.calls, "latency_s": round(time.perf_counter() - t0, 4),
                    "error": f"{type(exc).__name__}: {exc}", "seed": seed, "trace": []}
    score = task.score(item, result.text)
    usage = result.usage
    return {"text": result.text, "answer": score.extracted, "correct": score.correct,
            "finish_reason": tap.finish_reason(result.text, result.trace),
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "calls": usage.calls, "latency_s": round(usage.latency_s, 4), "error": None,
            "seed": seed, "trace": result.trace}


# -- samples.jsonl -------------------------------------------------------------------------
def _key(record: Mapping[str, Any]) -> Key:
    return str(record["task"]), str(record["strategy"]), str(record["item"])


def _final(record: Mapping[str, Any]) -> bool:
    """Whether a record is finished work: it has runs and none of them errored. An errored
    run (the model, the transport or the strategy raised) says nothing about the answer, so
    ``resume`` runs it again instead of counting it as wrong for good."""
    runs = record.get("runs") or []
    return bool(runs) and all(run.get("error") is None for run in runs)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace(path: Path, text: str) -> None:
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


def _append(fd: int, line: str) -> None:
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
            _replace(path, text)
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


class _Done:
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
    done = _Done(out / SAMPLES, resume)
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
        _replace(path, json.dumps(now, indent=2, ensure_ascii=False) + "\n")


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
    errors = [str(run["error"]) for run in runs if run.get("error") is not None]
    bad = [rec for rec in records if not _final(rec)]
    return ErrorStats(runs=len(runs), errored_runs=len(errors), records=len(records),
                      errored_records=len(bad), items=len({rec["item"] for rec in records}),
                      errored_items=len({rec["item"] for rec in bad}),
                      examples=list(dict.fromkeys(errors))[:3])


class _RetryCounter(logging.Handler):
    """Counts the remote client's retry and failover warnings while attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = str(record.msg)
        if "retrying" in message or "failing over" in message:
            self.count += 1


class _Bar:
    """A rich progress bar over (item, strategy) pairs, with tokens, errors and retries."""

    def __init__(self, total: int, console: Console, enabled: bool, retries: _RetryCounter):
        self.retries, self.tokens, self.errors = retries, 0, 0
        self.progress: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[tokens]:,} tok · {task.fields[errors]} errors · "
                           "{task.fields[retries]} retries"), TimeElapsedColumn(),
                console=console)
            self.task = self.progress.add_task("eval", total=total, tokens=0, errors=0, retries=0)

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, record: Record) -> None:
        runs = record["runs"]
        self.tokens += sum(r["prompt_tokens"] + r["completion_tokens"] for r in runs)
        self.errors += sum(r["error"] is not None for r in runs)
        if self.progress is not None:
            self.progress.update(self.task, advance=1, tokens=self.tokens, errors=self.errors,
                                 retries=self.retries.count)


def length_warning(records: Sequence[Record]) -> str | None:
    """A warning when over 5% of runs stopped at their token limit, naming the strategies."""
    runs = [(rec["strategy"], run) for rec in records for run in rec["runs"]]
    cut = [name for name, run in runs if run.get("finish_reason") == "length"]
    if not runs or len(cut) / len(runs) <= LENGTH_WARN:
        return None
    worst = ", ".join(dict.fromkeys(cut))
    return (f"{len(cut)}/{len(runs)} runs ({100 * len(cut) / len(runs):.0f}%) stopped at their "
            f"token limit ({worst}); accuracy is understated: raise --max-tokens")


# -- the run -------------------------------------------------------------------------------
async def evaluate(
    model: ChatModel, task: Task, strategies: Mapping[str, Any], items: Sequence[Sample], *,
    samples: int = 1, concurrency: int = 8, seed: int = 0, out: Path, resume: bool = False,
    progress: bool = True, console: Console | None = None,
    identity: Mapping[str, Any] | None = None,
) -> list[Record]:
    """Run every strategy K=``samples`` times on every item; the records, in item order.

    ``concurrency`` bounds the runs in flight (a run is one strategy call, however many
    model calls it makes). ``out`` is locked for the call (:func:`locked`) and must hold
    this run's ``identity`` or none (:func:`claim`; by default :func:`run_identity` with
    ``model.name``). With ``resume`` the finished (task, strategy, item) records already in
    ``out/samples.jsonl`` are kept as they are (whatever their K) and not recomputed, and
    errored runs are run again (the same seed ``seed + j``); the record with them redone is
    appended, and the file is then compacted (atomically) to one record per key. Without
    ``resume`` that file must not exist.
    """
    if samples < 1 or concurrency < 1:
        raise ValueError("samples and concurrency must be at least 1")
    console = console or Console(stderr=True)
    if identity is None:
        identity = run_identity(task, list(strategies), model=model.name, seed=seed,
                                samples=samples, items=items)
    with locked(out):
        claim(out, identity, resume=resume, console=console)
        return await _evaluate(model, task, strategies, items, samples=samples,
                               concurrency=concurrency, seed=seed, out=out, resume=resume,
                               progress=progress, console=console)


async def _evaluate(
    model: ChatModel, task: Task, strategies: Mapping[str, Any], items: Sequence[Sample], *,
    samples: int, concurrency: int, seed: int, out: Path, resume: bool, progress: bool,
    console: Console,
) -> list[Record]:
    path = out / SAMPLES
    done = _Done(path, resume)
    keys = [(task.name, name, item.id) for item in items for name in strategies]
    todo = [(item, name) for item in items for name in strategies
            if not done.final((task.name, name, item.id))]
    copies = {name: [seeded(s, seed + j) for j in range(samples)] for name, s in strategies.items()}
    gate = asyncio.Semaphore(concurrency)
    retries = _RetryCounter()
    remote_log = logging.getLogger("assist.remote")
    appended = 0

    async def pair(fd: int, bar: _Bar, item: Sample, name: str) -> None:
        nonlocal appended
        before = done.records.get((task.name, name, item.id))
        runs: list[dict[str, Any]] = list(before["runs"]) if before and before.get("runs") else []
        redo = ([j for j, run in enumerate(runs) if run.get("error") is not None] if runs
                else list(range(samples)))
        fresh = await asyncio.gather(*(_run_one(model, task, item, copies[name][j], seed + j, gate)
                                       for j in redo))
        runs = runs or [{} for _ in range(samples)]
        for j, run in zip(redo, fresh, strict=True):
            runs[j] = run
        record = {"task": task.name, "strategy": name, "item": item.id, "question": item.question,
                  "reference": item.answer, "runs": runs}
        line = json.dumps(record, default=str)
        _append(fd, line + "\n")  # on disk (page cache) before the next one: resume trusts it
        appended += 1
        done.add(record, line)
        bar.advance({"runs": list(fresh)})

    remote_log.addHandler(retries)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with _Bar(len(keys), console, progress, retries) as bar:
            if bar.progress is not None:
                bar.progress.update(bar.task, completed=len(keys) - len(todo))
            await asyncio.gather(*(pair(fd, bar, item, name) for item, name in todo))
        os.fsync(fd)
    finally:
        os.close(fd)
        remote_log.removeHandler(retries)
    if done.on_disk + appended > len(done.lines):  # superseded records: one line per key
        try:
            _replace(path, "".join(line + "\n" for line in done.lines.values()))
        except OSError as exc:  # every record is already on disk: later lines win on reading
            console.print(f"[yellow]warning: could not compact {path} ({exc}); it keeps "
                          "superseded records, which readers skip[/yellow]")
    records = [done.records[k] for k in keys]
    warning = length_warning(records)
    if warning:
        console.print(f"[yellow]warning: {warning}[/yellow]")
    return records
