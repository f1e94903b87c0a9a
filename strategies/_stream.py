"""Streaming a strategy: the events of :meth:`StrategyBase.stream` and the plumbing under them.

A strategy streams its *final stage*, the call that writes the answer, and nothing else:
the attempts before a reflection, the tool-calling turns, the samples of a vote are not
the answer and are never sent as if they were. So the events are

- :class:`Delta`: more of the answer's text (their concatenation is ``Result.text``);
- :class:`Progress`: opt-in news from a strategy that cannot stream its answer before it
  has decided (``sc``, ``bon``: samples done, the tally so far);
- :class:`Done`: the last event, carrying the same :class:`Result` ``run`` returns.

Where the deltas go is held in a context variable, the current :class:`Sink`: the task
running the outermost strategy sets it, tasks that strategy fans out to inherit it, and a
nested strategy's run (an attempt of ``sc@8(tools)``, the attempt of ``reflect(rag)``)
runs with none, so only the stage that writes the answer can reach the client. Under
``run`` there is no sink and every call is the plain ``chat`` it always was.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from assist.protocol import ChatModel, Messages
from assist.types import ChatCompletion, Choice, FunctionCall, Message, ToolCall, Usage

__all__ = ["Delta", "Done", "Event", "Progress", "Sink", "Watch", "current_sink", "no_sink", "streamed",
           "streamed_chat"]

# (choice index, the choice's content so far, its finish reason once it has finished)
Watch = Callable[[int, str, "str | None"], None]


@dataclass(frozen=True)
class Delta:
    """More of the final answer's text."""

    text: str
    kind: str = "delta"


@dataclass(frozen=True)
class Progress:
    """A voting strategy's news before its answer: ``{"samples": 5, "of": 16, "tally": {...}}``."""

    data: dict[str, Any]
    kind: str = "progress"


@dataclass(frozen=True)
class Done:
    """The end: the strategy's :class:`~strategies._base.Result`, exactly as ``run`` returns it."""

    result: Any
    kind: str = "done"


Event = Delta | Progress | Done


@dataclass
class Sink:
    """Where one streamed run's events go; ``sent`` is the answer text sent so far."""

    progress: bool = False  # whether Progress events are wanted (they cost the client bytes)
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    sent: str = ""

    def text(self, delta: str) -> None:
        if delta:
            self.sent += delta
            self.queue.put_nowait(Delta(delta))

    def news(self, data: dict[str, Any]) -> None:
        if self.progress:
            self.queue.put_nowait(Progress(data))

    def close(self) -> None:
        self.queue.put_nowait(None)


_SINK: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("strategy_sink", default=None)


def current_sink() -> Sink | None:
    return _SINK.get()


async def streamed(run: Callable[[], Awaitable[Any]], *, progress: bool) -> AsyncGenerator[Event]:
    """The events of ``run()`` (a strategy's run) with a sink of its own: what its final
    stage sends, then the rest of the answer at once (what the stage held back, or all of
    it from a strategy with no stage to stream), then :class:`Done`. Closing this generator
    cancels the run, and with it every call it has pending."""
    sink = Sink(progress=progress)

    async def work() -> Any:
        _SINK.set(sink)  # in this task's own context: the caller's is untouched
        try:
            return await run()
        finally:
            sink.close()

    task = asyncio.ensure_future(work())
    try:
        while (event := await sink.queue.get()) is not None:
            yield event
        result = await task
        rest = result.text[len(sink.sent):] if result.text.startswith(sink.sent) else ""
        if rest:
            yield Delta(rest)
        yield Done(result)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def streamed_chat(model: ChatModel, messages: Messages, watch: Watch, **kwargs: Any) -> ChatCompletion:
    """``model.chat(messages, **kwargs)`` made through the model's stream where it has one
    (``stream_chat``: the torch engine, the server's engine adapter, FakeChatModel),
    telling ``watch`` each choice's text as it grows; the chunks are put back together into
    the ChatCompletion ``chat`` returns (content, tool calls, finish reasons, usage). A
    model without a stream answers whole, and ``watch`` hears each choice once."""
    open_stream = getattr(model, "stream_chat", None)
    if open_stream is None:
        completion = await model.chat(messages, **kwargs)
        for choice in completion.choices:
            watch(choice.index, choice.message.content or "", choice.finish_reason or "stop")
        return completion
    stream = open_stream(messages, include_usage=True, **kwargs)
    if inspect.isawaitable(stream):  # the server's adapter prepares the stream in a worker
        stream = await stream
    texts: dict[int, str] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    finish: dict[int, str] = {}
    usage: dict[str, Any] | None = None
    name = getattr(model, "name", "")
    # Closing the stream (also when this call is cancelled) cancels the engine request.
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for chunk in stream:
            name = chunk.get("model") or name
            if chunk.get("usage"):
                usage = chunk["usage"]
            for part in chunk.get("choices") or []:
                i = int(part.get("index", 0))
                delta = part.get("delta") or {}
                texts.setdefault(i, "")
                if delta.get("content"):
                    texts[i] += delta["content"]
                    watch(i, texts[i], None)
                for tc in delta.get("tool_calls") or []:  # OpenAI sends a call in pieces by index
                    slot = calls.setdefault(i, {}).setdefault(int(tc.get("index", 0)),
                                                              {"id": None, "name": "", "arguments": ""})
                    slot["id"] = tc.get("id") or slot["id"]
                    function = tc.get("function") or {}
                    slot["name"] += function.get("name") or ""
                    slot["arguments"] += function.get("arguments") or ""
                if part.get("finish_reason"):
                    finish[i] = part["finish_reason"]
                    watch(i, texts[i], finish[i])
    choices = []
    for i in sorted(texts):
        made = [ToolCall(function=FunctionCall(name=c["name"], arguments=c["arguments"]),
                         **({"id": c["id"]} if c["id"] else {})) for _, c in sorted(calls.get(i, {}).items())]
        text = texts[i]
        message = Message(role="assistant", content=text or (None if made else ""), tool_calls=made or None)
        choices.append(Choice(index=i, message=message, finish_reason=finish.get(i, "stop")))
    return ChatCompletion(model=name, choices=choices, usage=Usage(**usage) if usage else Usage())


@contextlib.contextmanager
def no_sink() -> Any:
    """Run a nested strategy without the sink: its text is not the answer."""
    token = _SINK.set(None)
    try:
        yield
    finally:
        _SINK.reset(token)
