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
runs every errored run again (same seed) and replaces the record. A refusal the model will
always give (a 4xx such as ``context_length_exceeded``: the strategy's conversation outgrew
the context) is kept with ``"retry": false``: wrong for good, and not counted as an error.

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
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from assist.errors import AssistError
from assist.protocol import ChatModel, Messages
from assist.types import ChatCompletion
from evals._config import EvalError
from evals._records import (
    IDENTITY,
    LOCK,
    SAMPLES,
    ErrorStats,
    Finished,
    Record,
    append_line,
    claim,
    error_stats,
    locked,
    pending,
    read_records,
    replace_atomically,
    run_identity,
)
from evals._reuse import CallReuse
from evals.tasks import Sample, Task
from strategies import nodes, with_fields

__all__ = ["IDENTITY", "LOCK", "SAMPLES", "ErrorStats", "Record", "claim", "error_stats",
           "evaluate", "length_warning", "locked", "nodes", "parse_strategies", "pending",
           "prepare_strategies", "read_records", "run_identity", "seeded", "with_fields"]

LENGTH_WARN = 0.05  # share of runs cut at max_tokens above which the numbers are suspect


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
    from strategies import (
        EmbedderError,
        HashingEmbedder,
        MiniLMEmbedder,
        StoreError,
        store_from_facts,
    )

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

    def __init__(self, model: ChatModel, reuse: CallReuse | None = None) -> None:
        self.model = model
        self.reuse = reuse
        self.credit_s = 0.0  # time of calls served by an identical earlier one (CallReuse)
        self.name = model.name
        self.choices: list[list[tuple[str, str]]] = []  # per call: (text, finish_reason)
        self.prompt_tokens = self.completion_tokens = self.calls = 0
        self.refusals: list[BaseException] = []  # what the model itself raised

    @property
    def supports_n(self) -> bool:  # read live: a remote model may find out it lacks n
        return self.model.supports_n

    async def chat(self, messages: Messages, **kwargs: Any) -> ChatCompletion:
        try:
            if self.reuse is None:
                completion = await self.model.chat(messages, **kwargs)
            else:
                completion, credit = await self.reuse.chat(self.model, messages, kwargs)
                self.credit_s += credit
        except AssistError as exc:
            self.refusals.append(exc)
            raise
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


def _refusal(exc: BaseException, tap: _Tap) -> bool:
    """A 4xx from the model (context overflow, a bad parameter): the same call will be
    refused again, so the run is final; 408 and 429 are worth another try. Only what the
    model raised counts: a strategy's own error (a 400-class one too) is retried."""
    return (isinstance(exc, AssistError) and 400 <= exc.status < 500 and exc.status not in (408, 429)
            and any(exc is r for r in tap.refusals))


async def _run_one(model: ChatModel, task: Task, item: Sample, strategy: Any, seed: int,
                   gate: asyncio.Semaphore, reuse: CallReuse | None = None) -> dict[str, Any]:
    tap = _Tap(model, reuse)
    messages = [{"role": "user", "content": item.question}]
    async with gate:
        t0 = time.perf_counter()
        try:
            result = await strategy.run(tap, messages)
        except Exception as exc:  # noqa: BLE001 - one item's failure is data, not a crash
            return {"text": "", "answer": None, "correct": False, "finish_reason": "error",
                    "prompt_tokens": tap.prompt_tokens, "completion_tokens": tap.completion_tokens,
                    "calls": tap.calls, "latency_s": round(time.perf_counter() - t0 + tap.credit_s, 4),
                    "error": f"{type(exc).__name__}: {exc}", "retry": not _refusal(exc, tap), "seed": seed,
                    "trace": []}
    score = task.score(item, result.text)
    usage = result.usage
    return {"text": result.text, "answer": score.extracted, "correct": score.correct,
            "finish_reason": tap.finish_reason(result.text, result.trace),
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "calls": usage.calls, "latency_s": round(usage.latency_s + tap.credit_s, 4), "error": None,
            "seed": seed, "trace": result.trace}


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
    identity: Mapping[str, Any] | None = None, reuse_calls: bool = False,
) -> list[Record]:
    """Run every strategy K=``samples`` times on every item; the records, in item order.

    ``concurrency`` bounds the runs in flight (a run is one strategy call, however many
    model calls it makes). ``out`` is locked for the call (:func:`locked`) and must hold
    this run's ``identity`` or none (:func:`claim`; by default :func:`run_identity` with
    ``model.name``). With ``resume`` the finished (task, strategy, item) records already in
    ``out/samples.jsonl`` are kept as they are (whatever their K) and not recomputed, and
    errored runs are run again (the same seed ``seed + j``); the record with them redone is
    appended, and the file is then compacted (atomically) to one record per key. Without
    ``resume`` that file must not exist. With ``reuse_calls`` a greedy or seeded call made
    again (``sc`` and ``bon`` of one item draw the same samples) is computed once
    (:class:`evals._reuse.CallReuse`); every run still counts its tokens and its time.
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
                               progress=progress, console=console,
                               reuse=CallReuse() if reuse_calls else None)


async def _evaluate(
    model: ChatModel, task: Task, strategies: Mapping[str, Any], items: Sequence[Sample], *,
    samples: int, concurrency: int, seed: int, out: Path, resume: bool, progress: bool,
    console: Console, reuse: CallReuse | None = None,
) -> list[Record]:
    path = out / SAMPLES
    done = Finished(path, resume)
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
        fresh = await asyncio.gather(*(_run_one(model, task, item, copies[name][j], seed + j, gate, reuse)
                                       for j in redo))
        runs = runs or [{} for _ in range(samples)]
        for j, run in zip(redo, fresh, strict=True):
            runs[j] = run
        record = {"task": task.name, "strategy": name, "item": item.id, "question": item.question,
                  "reference": item.answer, "runs": runs}
        line = json.dumps(record, default=str)
        append_line(fd, line + "\n")  # on disk (page cache) before the next one: resume trusts it
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
            replace_atomically(path, "".join(line + "\n" for line in done.lines.values()))
        except OSError as exc:  # every record is already on disk: later lines win on reading
            console.print(f"[yellow]warning: could not compact {path} ({exc}); it keeps "
                          "superseded records, which readers skip[/yellow]")
    records = [done.records[k] for k in keys]
    if reuse is not None and reuse.served:
        console.print(f"{reuse.served} calls were served by an identical earlier call (reuse_calls)")
    warning = length_warning(records)
    if warning:
        console.print(f"[yellow]warning: {warning}[/yellow]")
    return records
