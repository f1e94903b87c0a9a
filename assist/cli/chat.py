"""``assist chat``: an interactive, multi-turn terminal chat with a checkpoint or a server.

::

    assist chat (--model PATH | --base-url URL --model-name NAME [--api-key K])
                [--strategy SPEC] [--system TEXT] [--temperature T] [--max-tokens N]

Without a strategy (or with ``plain``) the answer streams token by token; with one (``sc@8``,
``reflect``, ``tools``, ``rag``, ...) a spinner runs (with a vote's samples and leader) until
the stage that writes the answer starts, whose text then streams as it is written (see
``strategies._stream``), then a footer with the answer's tokens, calls and latency. ``/trace`` shows what the strategy
did for the last answer (see :mod:`assist.cli._chat_trace`). Ctrl-C during an answer cancels it
(and frees its batch slots); Ctrl-D or ``/exit`` quits. Bad flags, a missing checkpoint or an
unreachable server end in one line on stderr and exit status 2. ``assist.cli`` mounts this
with :func:`add_parser`; ``python -m assist.cli.chat chat ...`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from assist._signals import quiet_thread
from assist.cli._chat_backend import (
    Capped,
    ChatTarget,
    ChatUsageError,
    local_backend,
    remote_backend,
)
from assist.cli._flags import add_flags, float_at_least, from_args, int_at_least, opt, standalone

if TYPE_CHECKING:  # rich and the trace view load with the session: `assist --help` stays quick
    from rich.console import Console

    from assist.cli._chat_trace import Turn
    from assist.protocol import ChatModel

__all__ = ["ChatConfig", "ChatSession", "add_parser", "main"]

PROMPT = "you> "
HELP = """\
/strategy [SPEC]  show or switch the strategy: plain (streams), sc@8, reflect, tools, rag, ...
/trace            what the strategy did for the last answer
/reset            forget the conversation (the --system prompt stays)
/help             this list
/exit             quit (or Ctrl-D); Ctrl-C during an answer cancels it"""


@dataclass
class ChatConfig:
    model: str | None = opt(None, "a Hugging Face checkpoint folder", metavar="PATH",
                            exclusive="where", required_group=True)
    base_url: str | None = opt(None, "an OpenAI-compatible server", metavar="URL",
                               exclusive="where", required_group=True, env="OPENAI_BASE_URL",
                               env_unless=("model",))
    model_name: str | None = opt(None, "the server's model (with --base-url)", metavar="NAME")
    api_key: str | None = opt(None, "bearer key for the server (with --base-url)", metavar="KEY",
                              env="OPENAI_API_KEY", env_needs=("base_url",))
    strategy: str = opt("plain", "inference strategy, e.g. sc@8, reflect, tools (default: plain, "
                                 "streamed)", metavar="SPEC")
    system: str | None = opt(None, "a system prompt for the whole conversation", metavar="TEXT")
    temperature: float = opt(0.7, "temperature of streamed answers (default: 0.7); a strategy's "
                                  "own calls use its spec's, e.g. sc@8:t=0.5",
                             type=float_at_least(0.0), metavar="T")
    max_tokens: int | None = opt(None, "cap on each answer's and each strategy call's tokens "
                                       "(default: the rest of the context)",
                                 type=int_at_least(1), metavar="N")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``chat`` on ``assist``'s subparsers; ``func`` takes the args, returns a code."""
    p = subparsers.add_parser("chat", help="chat in the terminal with a checkpoint or a server")
    add_flags(p, ChatConfig)
    p.set_defaults(func=_chat)
    return p


def _line_reader() -> Callable[[str], str]:
    """prompt_toolkit's prompt where installed (and on a terminal), else input() + readline."""
    if sys.stdin.isatty():
        try:
            from prompt_toolkit import PromptSession
        except ImportError:
            pass
        else:
            return PromptSession().prompt
    with contextlib.suppress(ImportError):  # line editing and history for input()
        import readline  # noqa: F401
    return input


class ChatSession:
    """The conversation, the current strategy and the last answer; one line in at a time."""

    def __init__(self, backend: ChatTarget, runner: asyncio.Runner, console: Console, *,
                 strategy: str = "plain", system: str | None = None, temperature: float = 0.7,
                 max_tokens: int | None = None,
                 read_line: Callable[[str], str] | None = None) -> None:
        self.backend, self.runner, self.console = backend, runner, console
        # Capped forwards **kwargs: a ChatModel in behaviour, if not in its signature.
        capped = cast("ChatModel", Capped(backend.model, max_tokens)) if max_tokens else None
        self.model: ChatModel = capped or backend.model
        self.system, self.temperature, self.max_tokens = system, temperature, max_tokens
        self.read_line = read_line or _line_reader()
        self.messages: list[dict[str, Any]] = []
        self.last: Turn | None = None
        self.spec = "plain"
        self.strategy: Any = None  # None: plain, streamed at --temperature
        self.reset()
        error = self.set_strategy(strategy)
        if error:
            raise ChatUsageError(error)

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None

    def set_strategy(self, spec: str) -> str | None:
        """Switch strategy; the error message for a bad spec (the old one stays)."""
        import strategies

        try:
            strategy = strategies.parse(spec)
        except Exception as exc:  # noqa: BLE001 - any constructor's complaint is one line
            return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        self.close()
        # Bare "plain" streams at --temperature; "plain:t=0.2" streams at its own.
        self.spec, self.strategy = strategy.spec, None if strategy.spec == "plain" else strategy
        return None

    def close(self) -> None:
        """Release what the strategy holds (rag's store, say)."""
        if self.strategy is not None and hasattr(self.strategy, "close"):
            self.strategy.close()

    @property
    def streams(self) -> bool:
        from strategies import Plain

        return self.strategy is None or type(self.strategy) is Plain

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        c = self.console
        c.print(f"assist chat · {self.backend.name} · strategy {self.spec} · /help for commands",
                style="dim", markup=False, highlight=False)
        while True:
            try:
                line = self.read_line(PROMPT)
            except EOFError:
                c.print()
                return 0
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                c.print()
                continue
            try:
                if not self.handle(line.strip()):
                    return 0
            except KeyboardInterrupt:  # between the runner's handler and the next prompt
                c.print("cancelled", style="yellow")

    def handle(self, line: str) -> bool:
        """Act on one input line; False to quit."""
        if not line:
            return True
        if not line.startswith("/"):
            self.ask(line)
            return True
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/help":
            self.console.print(HELP, markup=False, highlight=False)
        elif command == "/reset":
            self.reset()
            self.console.print("conversation cleared", style="dim")
        elif command == "/strategy":
            error = self.set_strategy(rest) if rest else None
            if error:
                self._error(f"strategy: {error}")
            else:
                self.console.print(f"strategy: {self.spec}", style="dim", markup=False)
        elif command == "/trace":
            if self.last is None:
                self.console.print("no answer yet", style="dim")
            else:
                from assist.cli._chat_trace import render_trace

                for part in render_trace(self.last):
                    self.console.print(part)
        else:
            self._error(f"unknown command {command}; /help lists them")
        return True

    def ask(self, text: str) -> None:
        from assist.errors import AssistError, ContextLengthExceeded

        self.messages.append({"role": "user", "content": text})
        try:
            turn = self.runner.run(self._stream() if self.streams else self._solve())
        except KeyboardInterrupt:
            # The runner cancelled the task: the stream closed, the engine freed its slots.
            self.messages.pop()
            self.console.print("\ncancelled", style="yellow")
            return
        except AssistError as exc:
            self.messages.pop()
            hint = "; /reset starts over" if isinstance(exc, ContextLengthExceeded) else ""
            self._error(f"{exc.message}{hint}")
            return
        except Exception as exc:  # noqa: BLE001 - a strategy's failure must not end the chat
            self.messages.pop()
            self._error(f"{type(exc).__name__}: {exc}")
            return
        self.messages.append({"role": "assistant", "content": turn.text})
        self.last = turn
        from assist.cli._chat_trace import footer

        self.console.print(footer(turn), style="dim", markup=False, highlight=False)

    async def _stream(self) -> Turn:
        from assist.cli._chat_trace import Turn
        from strategies import Cost

        temperature, max_tokens = self.temperature, self.max_tokens
        if self.strategy is not None:  # plain with options: its own settings
            temperature = self.strategy.temperature
            caps = [c for c in (self.strategy.max_tokens, max_tokens) if c is not None]
            max_tokens = min(caps) if caps else None
        out = self.console.file
        parts: list[str] = []
        usage: dict[str, Any] = {}
        t0 = time.perf_counter()
        first: float | None = None
        try:
            stream = self.backend.stream(list(self.messages), temperature, max_tokens)
            async with contextlib.aclosing(stream) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            first = first or time.perf_counter() - t0
                            parts.append(delta)
                            out.write(delta)
                            out.flush()
        finally:
            if parts and not parts[-1].endswith("\n"):
                out.write("\n")
                out.flush()
        text = "".join(parts)
        cost = Cost(prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0), calls=1,
                    latency_s=time.perf_counter() - t0)
        call = {"step": "call", "n": 1, "temperature": temperature, "streamed": True,
                "usage": {**usage}, "texts": [text]}
        return Turn(self.spec, text, cost, [call], first_token_s=first)

    async def _solve(self) -> Turn:
        """Run the strategy, printing its final stage's text as that stage writes it. Until
        then (samples being drawn, tools called, an attempt checked) a spinner runs, saying
        how a vote stands; Ctrl-C closes the stream, which cancels every pending call."""
        from rich.text import Text

        from assist.cli._chat_trace import Turn
        from strategies import Delta, Done, Progress

        out = self.console.file
        status = self.console.status(f"{self.spec} …", spinner="dots")
        parts: list[str] = []
        result: Any = None
        status.start()
        try:
            stream = getattr(self.strategy, "stream", None)
            if stream is None:  # a plugin's strategy object without stream: its whole answer
                result = await self.strategy.run(self.model, list(self.messages))
            else:
                events = stream(self.model, list(self.messages), progress=True)
                async with contextlib.aclosing(events) as chunks:
                    async for event in chunks:
                        if isinstance(event, Delta) and event.text:
                            if not parts:  # the spinner's line must be gone before the text
                                status.stop()
                            parts.append(event.text)
                            out.write(event.text)
                            out.flush()
                        elif isinstance(event, Progress) and not parts:
                            status.update(f"{self.spec} · {_progress_line(event.data)} …")
                        elif isinstance(event, Done):
                            result = event.result
        finally:
            status.stop()
            if parts and not parts[-1].endswith("\n"):
                out.write("\n")
                out.flush()
        if result is None:
            raise RuntimeError(f"{self.spec} ended its stream without a result")
        if not parts:
            self.console.print(Text(result.text) if result.text else Text("(no answer)", "dim"))
        return Turn(self.spec, result.text, result.usage, list(result.trace), result.answer)

    def _error(self, message: str) -> None:
        self.console.print(f"error: {message}", style="red", markup=False, highlight=False)


def _progress_line(data: dict[str, Any]) -> str:
    """A vote's progress for the spinner: ``samples 3 of 8 · leading 42``."""
    line = f"samples {data.get('samples', '?')} of {data.get('of', '?')}"
    if data.get("scoring"):
        return line + " · scoring"
    tally: dict[str, float] = data.get("tally") or {}
    leader = data.get("leader") or (max(tally, key=lambda answer: tally[answer]) if tally else None)
    return line + (f" · leading {leader}" if leader is not None else "")


def _fail(message: str) -> int:
    print(f"assist chat: {message}", file=sys.stderr)
    return 2


def _chat(args: argparse.Namespace, *, console: Console | None = None,
          read_line: Callable[[str], str] | None = None) -> int:
    from rich.console import Console

    import strategies

    cfg = from_args(ChatConfig, args)
    if cfg.model_name and not cfg.base_url:
        return _fail("--model-name goes with --base-url (--model is a checkpoint folder)")
    if cfg.api_key and not cfg.base_url:
        return _fail("--api-key goes with --base-url")
    try:  # a bad spec fails before the slow model load
        strategies.parse(cfg.strategy)
    except ValueError as exc:
        return _fail(f"--strategy: {exc}")
    console = console or Console(highlight=False)
    with asyncio.Runner() as runner:
        # to_thread's workers leave Ctrl-C to the thread reading the prompt (assist/_signals.py).
        runner.get_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(initializer=quiet_thread))
        backend: ChatTarget | None = None
        try:
            backend = (local_backend(cfg.model, console) if cfg.model else
                       remote_backend(cfg.base_url or "", cfg.model_name, cfg.api_key, runner))
            session = ChatSession(backend, runner, console, strategy=cfg.strategy,
                                  system=cfg.system, temperature=cfg.temperature,
                                  max_tokens=cfg.max_tokens, read_line=read_line)
            try:
                return session.run()
            finally:
                session.close()
        except ChatUsageError as exc:
            return _fail(str(exc))
        except KeyboardInterrupt:  # while loading
            return 130
        finally:
            if backend is not None:
                closed = backend.close()
                if asyncio.iscoroutine(closed):
                    runner.run(closed)


def main(argv: Sequence[str] | None = None) -> int:
    """``assist chat ...`` on its own (the same parser ``assist.cli`` mounts)."""
    return standalone(add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
