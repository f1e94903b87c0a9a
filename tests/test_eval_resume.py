"""An eval's out folder is safe to resume: errored runs are run again and fail the exit
status, a resume with another experiment is refused, one writer at a time, and rewrites of
``samples.jsonl`` are atomic (issue 10, "Evals"). Scripted models, a real HTTP server that
is stopped mid-run, and a CLI killed with SIGKILL; no trained checkpoint needed."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import fcntl
import functools
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import assist
import strategies
from assist.cli.eval import main as eval_main
from assist.errors import ContextLengthExceeded, UpstreamError
from assist.types import ChatCompletion, Choice, Message, Usage
from evals._config import EvalError
from evals.harness import IDENTITY, LOCK, SAMPLES, evaluate, locked, read_records
from evals.tasks import ArithTask

REPO = Path(__file__).resolve().parents[1]
ARITH = ArithTask()
GOLD = {s.question: s.answer for s in ARITH.split("test", 40)}


def gold(question: str) -> str:
    return next(a for q, a in GOLD.items() if question.startswith(q))


@dataclass
class Model:
    """An async ChatModel that answers every arith question right, after ``delay`` seconds,
    and raises (a dead upstream) once ``fail_after`` calls were answered, or on every call
    whose question is in ``fail_on``. ``on_call(n)`` runs before the n-th call (1-based)."""

    fail_after: int | None = None
    fail_on: set[str] = field(default_factory=set)
    refuse_on: set[str] = field(default_factory=set)
    delay: float = 0.0
    on_call: Any = None
    name: str = "scripted"
    supports_n: bool = True
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def chat(self, messages: Any, **kwargs: Any) -> ChatCompletion:
        question = str(messages[-1]["content"])
        self.calls.append({"question": question, **kwargs})
        if self.on_call is not None:
            self.on_call(len(self.calls))
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise ConnectionError("upstream went away")
        if any(question.startswith(q) for q in self.fail_on):
            # an answered 502, not a crash: a 500 from an unhandled exception makes uvicorn
            # drop the keep-alive connection, which would fail the *next* item as well
            raise UpstreamError("the upstream failed this item")
        if any(question.startswith(q) for q in self.refuse_on):
            raise ContextLengthExceeded("the conversation outgrew the context")
        await asyncio.sleep(self.delay)
        n = int(kwargs.get("n", 1))
        choices = [Choice(index=i, message=Message(role="assistant", content=f"#### {gold(question)}"),
                          finish_reason="stop") for i in range(n)]
        return ChatCompletion(model=self.name, choices=choices,
                              usage=Usage(prompt_tokens=10, completion_tokens=3 * n,
                                          total_tokens=10 + 3 * n))


def run_eval(model: Any, specs: list[str], out: Path, n: int = 6, **kw: Any) -> list[dict]:
    kw.setdefault("progress", False)
    return asyncio.run(evaluate(model, ARITH, {s: strategies.parse(s) for s in specs},
                                ARITH.split("test", n), out=out, **kw))


def lines_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / SAMPLES).read_text().splitlines()]


# -- 1. errored runs are not final ------------------------------------------------------------
def test_resume_runs_errored_runs_again_and_only_those(tmp_path):
    # K=2 runs per item; the upstream dies after 5 of the 12 calls.
    first = run_eval(Model(fail_after=5), ["direct"], tmp_path, samples=2)
    errored = [(r["item"], j) for r in first for j, run in enumerate(r["runs"]) if run["error"]]
    assert len(errored) == 7
    healthy = Model()
    records = run_eval(healthy, ["direct"], tmp_path, samples=2, resume=True)
    assert len(healthy.calls) == 7  # the errored runs, not the finished ones
    assert sorted(c["seed"] for c in healthy.calls) == sorted(j for _, j in errored)
    assert all(run["error"] is None and run["correct"] for r in records for run in r["runs"])
    assert [[run["seed"] for run in r["runs"]] for r in records] == [[0, 1]] * 6
    on_disk = {r["item"]: r for r in lines_of(tmp_path)}  # compacted: one record per item
    assert len(lines_of(tmp_path)) == 6 and on_disk == {r["item"]: r for r in records}
    again = Model()
    run_eval(again, ["direct"], tmp_path, samples=2, resume=True)
    assert not again.calls  # now everything is final


class _Server:
    """``assist serve``'s app over a scripted model on a fixed port, in a thread; stop() is
    the server dying, start() brings it back on the same port."""

    def __init__(self, model: Any) -> None:
        self.model, self.port, self.server, self.thread = model, 0, None, None

    def start(self) -> str:
        import uvicorn

        from assist.server import EngineBackend, create_app

        app = create_app(EngineBackend(self.model), owns_backend=False, names=["assistant"])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="critical", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(30)


@pytest.fixture
def no_retries(monkeypatch):
    """The CLI's remote client without backoff retries, so a dead server fails fast."""
    monkeypatch.setattr(assist, "connect", functools.partial(assist.connect, max_retries=0))


def cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = eval_main(["eval", "run", *args])
    return code, err.getvalue()


def test_a_server_dying_mid_run_fails_the_run_and_resume_recovers(tmp_path, no_retries):
    model = Model()
    server = _Server(model)
    url = server.start()

    def die(n: int) -> None:  # the 4th request is the last answered; then the server exits
        if n == 4:
            server.server.should_exit = True
            model.fail_after = 4  # a request that slips in while it shuts down gets a 500

    model.on_call = die
    out = tmp_path / "ev"
    args = ["--task", "arith", "--strategies", "direct", "--base-url", url, "--limit", "12",
            "--concurrency", "1", "--out", str(out)]
    try:
        code, err = cli(*args)
        assert code == 3, err
        assert "8 of 12 runs (66.7%) errored, on 8 of 12 items" in err and "--resume" in err
        results = json.loads((out / "results.json").read_text())
        assert results["errors"]["errored_items"] == 8 and results["errors"]["items"] == 12
        assert results["summary"]["arith"]["direct"]["error_rate"] == pytest.approx(8 / 12)
        assert "**8 of 12 items errored**" in (out / "report.md").read_text()
        assert server.thread is not None
        server.thread.join(30)  # it was told to exit; its shutdown may outlast the run's end
        assert not server.thread.is_alive()

        model.on_call = model.fail_after = None
        server.start()  # back, on the same port
        before = len(model.calls)
        code, err = cli(*args, "--resume")
        assert code == 0, err
        assert len(model.calls) - before == 8  # the errored items again, not the finished ones
        results = json.loads((out / "results.json").read_text())
        assert results["summary"]["arith"]["direct"]["accuracy"] == 1.0
        assert results["errors"]["errored_items"] == 0 and "errored" not in err
        assert len(lines_of(out)) == 12
    finally:
        server.stop()


def test_max_error_rate_sets_what_fails_the_run(tmp_path, no_retries):
    model = Model(fail_on={ARITH.split("test", 20)[3].question})  # 1 of 20 items: 5%
    server = _Server(model)
    url = server.start()
    try:
        base = ["--task", "arith", "--strategies", "direct", "--base-url", url, "--limit", "20"]
        code, err = cli(*base, "--out", str(tmp_path / "a"))  # default 0.05: 5% is not above
        assert code == 0 and "1 of 20 runs (5.0%) errored" in err and "within" in err, err
        code, err = cli(*base, "--out", str(tmp_path / "b"), "--max-error-rate", "0")
        assert code == 3 and "above --max-error-rate 0" in err, err
        code, err = cli(*base, "--out", str(tmp_path / "c"), "--max-error-rate", "1.5")
        assert code == 2 and "--max-error-rate must be between 0 and 1" in err
    finally:
        server.stop()


# -- 2. resume refuses another experiment -----------------------------------------------------
@pytest.mark.parametrize("change, needle", [
    ({"seed": 1}, "another seed (--seed): 0 there, 1 now"),
    ({"samples": 2}, "another runs per item (--samples): 1 there, 2 now"),
    ({"specs": ["direct", "cot"]}, "another strategy set (--strategies): this one adds cot"),
    ({"specs": ["cot"]}, "adds cot and leaves out direct"),
    ({"model": "other"}, 'another model (--model, or --base-url with --model-name): "scripted"'),
])
def test_resume_refuses_another_identity(tmp_path, change, needle):
    run_eval(Model(), ["direct"], tmp_path, n=3)
    before = (tmp_path / SAMPLES).read_bytes()
    model = Model(name=change.get("model", "scripted"))
    with pytest.raises(EvalError, match="--resume") as err:
        run_eval(model, change.get("specs", ["direct"]), tmp_path, n=3, resume=True,
                 seed=change.get("seed", 0), samples=change.get("samples", 1))
    assert needle in str(err.value), err.value
    assert not model.calls and (tmp_path / SAMPLES).read_bytes() == before


def test_resume_may_change_the_limit_not_the_data(tmp_path):
    run_eval(Model(), ["direct"], tmp_path, n=3)
    identity = json.loads((tmp_path / IDENTITY).read_text())
    assert identity["strategies"] == ["direct"] and identity["seed"] == 0
    assert identity["task"] == "arith" and identity["dataset"].startswith("sha256:")
    more = Model()
    assert len(run_eval(more, ["direct"], tmp_path, n=5, resume=True)) == 5
    assert len(more.calls) == 2  # --limit grew: the two new items only
    other = ArithTask(type(ARITH.config)(seed=ARITH.config.seed + 1))  # another test split
    with pytest.raises(EvalError, match=r"another test data"):
        asyncio.run(evaluate(Model(), other, {"direct": strategies.parse("direct")},
                             other.split("test", 3), out=tmp_path, resume=True, progress=False))


def test_a_folder_from_before_identities_is_adopted_with_a_warning(tmp_path):
    from rich.console import Console

    run_eval(Model(), ["direct"], tmp_path, n=2)
    (tmp_path / IDENTITY).unlink()  # written by a version that recorded none
    console = Console(file=io.StringIO(), width=300)
    more = Model()
    run_eval(more, ["direct"], tmp_path, n=3, resume=True, console=console)
    assert "records no identity" in console.file.getvalue() and len(more.calls) == 1
    assert json.loads((tmp_path / IDENTITY).read_text())["strategies"] == ["direct"]
    with pytest.raises(EvalError, match="another seed"):  # checked from then on
        run_eval(Model(), ["direct"], tmp_path, n=3, resume=True, seed=3)


def test_cli_resume_with_another_seed_or_model_is_one_line_exit_2(tmp_path, no_retries):
    server = _Server(Model())
    url = server.start()
    out = tmp_path / "ev"
    base = ["--task", "arith", "--strategies", "direct", "--base-url", url, "--limit", "3",
            "--out", str(out)]
    try:
        assert cli(*base)[0] == 0
        before = (out / SAMPLES).read_bytes()
        for extra, needle in ((["--seed", "7"], "another seed (--seed): 0 there, 7 now"),
                              (["--model-name", "other"], "another model"),
                              (["--strategies", "direct,cot"], "this one adds cot")):
            code, err = cli(*base, "--resume", *extra)
            assert code == 2 and needle in err, err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert (out / SAMPLES).read_bytes() == before
    finally:
        server.stop()


# -- 3. one writer per folder -----------------------------------------------------------------
def test_a_second_writer_fails_at_once(tmp_path):
    # Another open of the lock file (as another process would hold it) blocks evaluate.
    (tmp_path / LOCK).write_text("4242\n")
    with open(tmp_path / LOCK) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        model = Model()
        with pytest.raises(EvalError, match=r"in use by another eval \(pid 4242\)"):
            run_eval(model, ["direct"], tmp_path, n=2)
        assert not model.calls and not (tmp_path / SAMPLES).exists()
    run_eval(Model(), ["direct"], tmp_path, n=2)  # released: fine now


def test_a_second_cli_on_a_locked_folder_exits_2(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # passes the flag check; never loaded
    out = tmp_path / "ev"
    with locked(out):  # this process is the first writer
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "assist.cli", "eval", "run", "--task", "arith", "--strategies",
             "direct", "--model", str(tmp_path / "m"), "--limit", "2", "--out", str(out)],
            capture_output=True, text=True, timeout=120, cwd=REPO)
        assert time.monotonic() - t0 < 60
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"in use by another eval (pid {os.getpid()})" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (out / SAMPLES).exists()


# -- 4. atomic rewrites, and SIGKILL then --resume --------------------------------------------
@contextlib.contextmanager
def disk_fails_mid_write(monkeypatch, name: str = SAMPLES) -> Iterator[list[str]]:
    """Every file opened for writing (not appending) whose name contains ``name`` gets half of
    its first write, then an ENOSPC: a crash in the middle of a rewrite."""
    real_open, hits = builtins.open, []

    class Half:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def write(self, data: str) -> int:
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            hits.append(self.handle.name)
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.handle, attr)

        def __enter__(self) -> Half:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if any(m in mode for m in "wx") and name in os.fspath(file):
            return Half(handle)
        return handle

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # pathlib's write_text goes through io.open
    yield hits
    monkeypatch.undo()


def test_a_crash_while_dropping_a_torn_tail_keeps_the_file(tmp_path, monkeypatch):
    run_eval(Model(), ["direct"], tmp_path, n=4)
    lines = (tmp_path / SAMPLES).read_text().splitlines()
    torn = "\n".join(lines[:3]) + "\n" + lines[3][:40]  # killed mid-append
    (tmp_path / SAMPLES).write_text(torn)
    with disk_fails_mid_write(monkeypatch) as hits, pytest.raises((EvalError, OSError)):
        read_records(tmp_path / SAMPLES)
    assert hits, "the rewrite was not attempted"
    assert (tmp_path / SAMPLES).read_text() == torn  # every finished record still there
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert len(read_records(tmp_path / SAMPLES)) == 3  # and the repair works once it can


def test_a_crash_while_compacting_keeps_every_record(tmp_path, monkeypatch):
    run_eval(Model(fail_after=2), ["direct"], tmp_path, n=4)  # items 2, 3 errored
    with disk_fails_mid_write(monkeypatch) as hits:
        records = run_eval(Model(), ["direct"], tmp_path, n=4, resume=True)
    assert hits and all(r["runs"][0]["correct"] for r in records)
    kept = read_records(tmp_path / SAMPLES)  # the old lines plus the two re-run records
    assert len(kept) == 6 and {r["item"]: r for r in kept} == {r["item"]: r for r in records}
    again = Model()
    run_eval(again, ["direct"], tmp_path, n=4, resume=True)
    assert not again.calls and len(lines_of(tmp_path)) == 4  # compacted this time


def test_sigkill_then_resume_loses_no_finished_record(tmp_path):
    model = Model(delay=0.15)
    server = _Server(model)
    url = server.start()
    out = tmp_path / "ev"
    args = ["--task", "arith", "--strategies", "direct", "--base-url", url, "--limit", "10",
            "--concurrency", "1", "--out", str(out)]
    try:
        proc = subprocess.Popen([sys.executable, "-m", "assist.cli", "eval", "run", *args],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not ((out / SAMPLES).exists() and len((out / SAMPLES).read_bytes().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
        kept = (out / SAMPLES).read_bytes()
        whole = kept[: kept.rfind(b"\n") + 1]
        assert 3 <= len(whole.splitlines()) < 10
        code, err = cli(*args, "--resume")  # the kernel dropped the dead run's lock
        assert code == 0, err
        after = (out / SAMPLES).read_bytes()
        assert after.startswith(whole)  # finished records kept byte for byte
        assert sorted(r["item"] for r in lines_of(out)) == sorted(f"arith-test-{i}" for i in range(10))
        assert json.loads((out / "results.json").read_text())["summary"]["arith"]["direct"][
            "accuracy"] == 1.0
    finally:
        server.stop()


def test_a_refusal_is_final_not_an_error(tmp_path):
    """A context overflow will happen again on every try: the run is wrong for good, the
    eval exits 0, and --resume does not ask again."""
    items = ARITH.split("test", 10)
    model = Model(refuse_on={items[2].question, items[5].question})
    out = tmp_path / "ev"
    records = asyncio.run(evaluate(model, ARITH, {"direct": strategies.parse("direct")}, items, out=out))
    refused = [r for r in records if r["runs"][0]["error"]]
    assert len(refused) == 2 and all(r["runs"][0]["retry"] is False for r in refused)
    before = len(model.calls)
    asyncio.run(evaluate(model, ARITH, {"direct": strategies.parse("direct")}, items, out=out, resume=True))
    assert len(model.calls) == before  # nothing asked again
    from evals._records import error_stats

    stats = error_stats(read_records(out / SAMPLES))
    assert stats.errored_runs == 0 and stats.runs == 10
