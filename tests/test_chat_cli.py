"""``assist chat``: driven through a pseudo-terminal as a person would, plus in-process checks.

The terminal test types into a real ``assist chat`` over the trained checkpoint and reads
what the screen shows (ANSI stripped) with a deadline per step, never a fixed sleep. The
in-process tests script the input line by line over a fake backend, where streaming, Ctrl-C
and every trace step kind can be checked exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import io
import os
import pty
import re
import select
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from assist.cli._chat_backend import ChatTarget
from assist.cli._chat_trace import Turn, render_trace
from assist.cli.chat import ChatSession, _chat, _progress_line, add_parser, main
from assist.testing import FakeChatModel
from strategies import Cost

REPO = Path(__file__).resolve().parents[1]
# CSI and OSC sequences, keypad mode switches, carriage returns: what a screen hides.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[=>]|\r")
PROMPT = "you> "


def _cli_has_chat() -> bool:
    from assist.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "chat" in subs.choices


class Terminal:
    """A child process on a pseudo-terminal: ``send`` keys, ``expect`` a regex on the screen."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: nothing but exec (we are a copy of pytest)
            try:
                os.chdir(REPO)
                # A runner that started us in the background (SIGINT ignored) must not take
                # Ctrl-C away from the chat: a terminal delivers it, Python must see it.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(argv[0], list(argv), env)
            finally:
                os._exit(127)
        # A real size, so rich lays tables out as on a person's screen.
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.raw = b""
        self.pos = 0  # how far into the cleaned screen text expect() has consumed

    def screen(self) -> str:
        text = ANSI.sub("", self.raw.decode("utf-8", "replace"))
        return re.sub(r"\x1b[^a-zA-Z]*$", "", text)  # a sequence still arriving

    def _read(self, until: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.screen(), self.pos)
            if match:
                self.pos = match.end()
                return match
            if time.monotonic() > deadline or not self._read(deadline):
                if time.monotonic() <= deadline and self._alive():
                    continue
                raise AssertionError(f"{pattern!r} not on the screen within {timeout}s; "
                                     f"after it so far:\n{self.screen()[self.pos:][-3000:]}")

    def wait_reading(self, timeout: float = 20.0) -> None:
        """Until the child's main thread sleeps in select()/poll() (Linux /proc; else at once)."""
        proc = Path(f"/proc/{self.pid}")
        deadline = time.monotonic() + timeout
        while (proc / "wchan").exists():
            try:
                state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
                where = (proc / "wchan").read_text()
            except OSError:
                return
            # Sleeping with wchan "0": this kernel hides wchan, so we cannot tell; go on.
            if state == "S" and (where == "0" or "poll" in where or "select" in where):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the chat is not reading the terminal ({state} {where})")
            self._read(min(deadline, time.monotonic() + 0.01))  # drain while we wait

    def _alive(self) -> bool:
        return os.waitpid(self.pid, os.WNOHANG) == (0, 0)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(min(deadline, time.monotonic() + 0.1))  # drain, or the child may block
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
        raise AssertionError(f"the chat did not exit within {timeout}s:\n{self.screen()[-2000:]}")

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal(trained_run: tuple[Path, float]) -> Iterator[Terminal]:
    run, _ = trained_run
    # Through `assist chat` once assist.cli mounts it; the module's own entry until then.
    entry = ["assist.cli"] if _cli_has_chat() else ["assist.cli.chat"]
    argv = [sys.executable, "-m", *entry, "chat", "--model", str(run / "rlhf"), "--max-tokens", "48",
            "--temperature", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm-256color", "COLUMNS": "120",
           "LINES": "40", "PYTHONUNBUFFERED": "1"}
    term = Terminal(argv, env)
    yield term
    term.close()


def test_chat_in_a_terminal(terminal: Terminal) -> None:
    t = terminal
    t.expect(r"assist chat · rlhf · strategy plain", timeout=90)  # torch's import is slow
    t.expect(PROMPT)
    t.send("What is 2+2?\r")
    t.expect(r"What is 2\+2\?\n")  # the line as typed, echoed
    answer = t.expect(r"([\s\S]*?)\nplain · (\d+) tokens \(\d+ in, (\d+) out\) · 1 call")
    assert int(answer.group(3)) > 0 and answer.group(1).strip()  # streamed text, then footer
    t.expect(PROMPT)

    t.send("/strategy sc@2\r")
    t.expect(r"strategy: sc@2")
    t.expect(PROMPT)
    t.send("What is 3+4?\r")
    t.expect(r"\nsc@2 · (answer .* · )?\d+ tokens \(\d+ in, \d+ out\) · \d+ calls? · [\d.]+ s")
    t.expect(PROMPT)
    t.send("/trace\r")
    t.expect(r"trace of the last answer")
    t.expect(r"call 1\s+n=2")
    t.expect(r"self-consistency votes")
    t.expect(r"answer\s*[│┃]\s*votes")
    t.expect(r"2 samples")
    t.expect(PROMPT)

    t.send("/strategy nope@\r")
    t.expect(r"error: strategy: unknown strategy 'nope'")
    t.expect(PROMPT)
    t.send("/strategy\r")  # the old strategy is still in force
    t.expect(r"strategy: sc@2")
    t.expect(PROMPT)
    # Ctrl-C at the prompt drops the line, not the chat. CPython's readline checks for signals
    # only when its select() is interrupted; a SIGINT that lands while it is still drawing
    # (between echoing a key and blocking again) stays pending until Enter. No person types
    # that fast, a test on a loaded machine does: so the key goes only once the chat is
    # blocked reading the terminal again.
    t.send("half a line")
    t.expect(r"half a line")
    t.wait_reading()
    t.send("\x03")
    t.expect(PROMPT)
    t.send("/exit\r")
    assert t.wait() == 0


# -- in-process: a fake backend and scripted input ----------------------------------------
class Script:
    """read_line over a list of lines; EOF (Ctrl-D) after the last one."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines)
        self.prompts = 0

    def __call__(self, prompt: str) -> str:
        assert prompt == PROMPT
        self.prompts += 1
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


def _chunk(text: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    if usage is not None:
        return {"choices": [], "usage": usage}
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def _session(lines: Sequence[str], stream: Any, model: Any = None, **options: Any,
             ) -> tuple[ChatSession, io.StringIO, asyncio.Runner]:
    out = io.StringIO()
    console = Console(file=out, width=120, highlight=False)
    runner = asyncio.Runner()
    backend = ChatTarget(model or FakeChatModel(["#### 4"]), stream, "fake")
    return ChatSession(backend, runner, console, read_line=Script(lines), **options), out, runner


def test_streamed_deltas_reach_the_screen_as_they_arrive() -> None:
    seen: list[str] = []
    asked: list[tuple[list[dict[str, Any]], float, int | None]] = []

    async def stream(messages: list[dict[str, Any]], temperature: float,
                     max_tokens: int | None) -> AsyncIterator[dict[str, Any]]:
        asked.append((messages, temperature, max_tokens))
        for piece in ("Hel", "lo", " there"):
            yield _chunk(piece)
            seen.append(out.getvalue())  # what was on screen before the next token came
        yield _chunk(usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})

    session, out, runner = _session(["hi", "again", "/reset", "fresh"], stream,
                                    system="be brief", temperature=0.3, max_tokens=9)
    with runner:
        assert session.run() == 0
    assert seen[0].endswith("Hel") and seen[1].endswith("Hello") and seen[2].endswith("Hello there")
    assert "plain · 8 tokens (5 in, 3 out) · 1 call" in out.getvalue()
    # Multi-turn: the second question carries the first exchange; /reset keeps only the system.
    assert [m["content"] for m in asked[1][0]] == ["be brief", "hi", "Hello there", "again"]
    assert [m["content"] for m in asked[2][0]] == ["be brief", "fresh"]
    assert asked[0][1:] == (0.3, 9)


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """SIGINT as in a terminal, whatever the runner did to it (a backgrounded job ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_the_answer_and_the_chat_goes_on(default_sigint: None) -> None:
    closed: list[bool] = []

    async def stream(messages: list[dict[str, Any]], temperature: float,
                     max_tokens: int | None) -> AsyncIterator[dict[str, Any]]:
        try:
            yield _chunk("partial")
            signal.raise_signal(signal.SIGINT)  # as the terminal does on Ctrl-C
            await asyncio.sleep(30)
            yield _chunk("never")
        finally:
            closed.append(True)  # the stream was closed: an engine frees its slots here

    session, out, runner = _session(["long question", "/exit"], stream)
    with runner:
        assert session.run() == 0
    assert closed == [True]
    assert "cancelled" in out.getvalue() and "never" not in out.getvalue()
    assert session.messages == [] and session.last is None  # the cut turn left no trace


def test_strategies_switch_mid_conversation_and_trace_their_votes() -> None:
    async def stream(messages: list[dict[str, Any]], temperature: float,
                     max_tokens: int | None) -> AsyncIterator[dict[str, Any]]:
        yield _chunk("streamed")

    model = FakeChatModel(["so #### 4", "hmm #### 5", "yes #### 4"])
    lines = ["/help", "/trace", "/strategy sc@3", "q1", "/trace", "/strategy nope@",
             "/strategy", "/bogus", "/strategy plain", "q2", "/exit", "never read"]
    session, out, runner = _session(lines, stream, model=model, max_tokens=7)
    with runner:
        assert session.run() == 0
    text = out.getvalue()
    assert "/strategy [SPEC]" in text and "no answer yet" in text
    assert "sc@3 · answer 4 ·" in text and "· 1 call ·" in text  # one n=3 call
    assert re.search(r"self-consistency votes[\s\S]*4\s*│\s*2\s*│\s*winner", text)
    assert "error: strategy: unknown strategy 'nope'" in text
    assert text.count("strategy: sc@3") == 2  # switched, then still in force after the error
    assert "error: unknown command /bogus" in text
    assert "streamed\nplain ·" in text  # back to streaming
    assert model.calls[0]["max_tokens"] == 7  # --max-tokens caps a strategy's calls
    assert session.read_line.lines == ["never read"]  # type: ignore[attr-defined]


class _Watched(FakeChatModel):
    """A scripted model whose stream waits, after each piece, until the piece is on screen
    (or gives up after many turns of the loop): it records what the screen showed."""

    screen: io.StringIO | None = None
    shown: list[bool] = []

    async def stream_chat(self, messages: Any, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        text = ""
        async for chunk in super().stream_chat(messages, **kwargs):
            yield chunk
            for part in chunk["choices"]:
                text += (part.get("delta") or {}).get("content") or ""
            if text and self.screen is not None:
                for _ in range(1000):  # the event loop's turns, not time: the CLI prints in a few
                    if self.screen.getvalue().endswith(text):
                        break
                    await asyncio.sleep(0)
                self.shown.append(self.screen.getvalue().endswith(text))


def test_a_strategys_final_stage_streams_to_the_screen() -> None:
    async def stream(messages: list[dict[str, Any]], temperature: float,
                     max_tokens: int | None) -> AsyncIterator[dict[str, Any]]:
        yield _chunk("unused")

    model = _Watched(["Mia has 5 apples, then 3 more: 5 + 3 = 8\n#### 8"])
    model.shown = []
    session, out, runner = _session(["/strategy cot", "q", "/trace", "/exit"], stream, model=model)
    model.screen = out
    with runner:
        assert session.run() == 0
    text = out.getvalue()
    assert len(model.shown) > 3 and all(model.shown)  # each piece on screen before the next was made
    assert "5 + 3 = 8\n#### 8\ncot · answer 8 · " in text and "· 1 call ·" in text  # text, then the footer
    assert "trace of the last answer" in text and session.last is not None and session.last.answer == "8"
    assert session.messages[-1] == {"role": "assistant", "content": "Mia has 5 apples, then 3 more: 5 + 3 = 8\n#### 8"}


def test_a_votes_progress_reads_as_one_line() -> None:
    assert _progress_line({"samples": 3, "of": 8, "tally": {"4": 2, "5": 1}, "leader": "4"}) == \
        "samples 3 of 8 · leading 4"
    assert _progress_line({"samples": 2, "of": 4, "tally": {"7": 2}}) == "samples 2 of 4 · leading 7"
    assert _progress_line({"samples": 4, "of": 4, "scoring": True}) == "samples 4 of 4 · scoring"


def test_trace_renders_every_step_kind() -> None:
    trace: list[dict[str, Any]] = [
        {"step": "retrieve", "query": "capital of France", "mode": "hybrid",
         "passages": [{"id": "geo-1", "score": 0.91}, {"id": "geo-7", "score": 0.4}]},
        {"step": "call", "n": 1, "temperature": 0.0,
         "usage": {"prompt_tokens": 12, "completion_tokens": 5}, "texts": ["[not markup] Paris"]},
        {"step": "tool", "name": "calculator", "arguments": {"expression": "6*7"},
         "result": "42", "error": None, "seconds": 0.01},
        {"step": "tool", "name": "python", "arguments": {"code": "1/0"}, "result": None,
         "error": "ZeroDivisionError: division by zero", "seconds": 0.2},
        {"step": "reflect", "round": 1, "check": "The sum is wrong. Revised: #### 5",
         "stands": False, "answer_before": "4", "answer_after": "5"},
        {"step": "citations", "cited": ["geo-1", "x"], "valid": ["geo-1"], "invalid": ["x"]},
        {"step": "score", "scores": [0.2, 0.9], "answers": ["4", "5"], "chosen": 1},
        {"step": "validate", "attempt": 1, "ok": False, "problem": "not JSON"},
        {"step": "novel", "detail": 3},
    ]
    turn = Turn("reflect(rag)", "Paris", Cost(12, 5, 1, 0.5), trace, "Paris")
    out = io.StringIO()
    console = Console(file=out, width=120)
    for part in render_trace(turn):
        console.print(part)
    text = out.getvalue()
    for expected in ("retrieved (hybrid) for 'capital of France'", "geo-1", "0.9100",
                     "call 1", "[not markup] Paris", 'calculator({"expression": "6*7"})', "→ 42",
                     "error: ZeroDivisionError", "revised '4' → '5'", "critique: The sum is wrong",
                     "invalid x", "best-of-n scores", "chosen", "json attempt 1: not JSON",
                     'novel: {"step": "novel", "detail": 3}', "17 tokens (12 in, 5 out)"):
        assert expected in text, expected


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --model --base-url is required"),
    (["--model", "m", "--base-url", "http://x"], "not allowed with argument"),
    (["--model", "m", "--temperature", "-1"], "must be >= 0"),
    (["--model", "m", "--max-tokens", "0"], "must be at least 1"),
])
def test_bad_flags_are_one_line_and_exit_2(argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["chat", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_bad_targets_are_one_line_and_exit_2(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--model", str(tmp_path / "missing")], "no Hugging Face checkpoint (config.json)"),
        (["--model", str(tmp_path), "--strategy", "nope@"], "--strategy: unknown strategy"),
        (["--base-url", "http://127.0.0.1:1"], "--base-url needs --model-name"),
        (["--model", str(tmp_path), "--model-name", "x"], "--model-name goes with --base-url"),
        (["--base-url", "ftp://host", "--model-name", "x"], "must start with http"),
        (["--base-url", f"http://127.0.0.1:{_closed_port()}", "--model-name", "x"],
         "cannot reach http://127.0.0.1:"),
    ]
    for argv, message in cases:
        assert main(["chat", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def test_remote_server_streams_and_runs_strategies(trained_run: tuple[Path, float]) -> None:
    from assist.engine import TorchEngine
    from assist.server import create_app
    from assist.server._backend import EngineBackend
    from assist.testing import running_server

    run, _ = trained_run
    engine = TorchEngine(run / "rlhf", max_batch=4, name="assistant")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    with running_server(create_app(EngineBackend(engine))) as url:
        args = parser.parse_args(["chat", "--base-url", f"{url}/v1", "--model-name", "assistant",
                                  "--max-tokens", "16"])
        out = io.StringIO()
        script = Script(["Hi!", "/strategy sc@2", "What is 1+1?", "/trace"])
        assert _chat(args, console=Console(file=out, width=120), read_line=script) == 0
        text = out.getvalue()
        assert "assist chat · assistant · strategy plain" in text
        assert re.search(r"\nplain · \d+ tokens \(\d+ in, [1-9]\d* out\) · 1 call", text)
        assert "self-consistency votes" in text
        wrong = parser.parse_args(["chat", "--base-url", url, "--model-name", "gpt-9"])
        assert _chat(wrong, console=Console(file=io.StringIO())) == 2
