"""A strategy's answer over server-sent events, as its final stage writes it.

Each choice's strategy runs through ``strategy.stream`` (``strategies.StrategyBase``): the
text of the stage that writes its answer arrives as ``delta`` events and goes out at once
as ``chat.completion.chunk`` content; several choices interleave, each under its index.
The other stages (an attempt before a reflection, tool-calling turns, a vote's samples)
are not the answer and are never sent as content.

``stream_progress`` (our extension, opt-in) sends a voting strategy's progress in chunks
with an empty ``choices`` list and a top-level ``progress`` object: the official ``openai``
client parses them as chunks with no choices, as it does OpenAI's own usage chunk, so an
OpenAI client reads the same answer with or without it.

``return_trace`` (our extension, only when asked) puts a choice's ``trace``, ``answer`` and
``cost`` on that choice in its last chunk, the one with its ``finish_reason``, as fields the
``openai`` client keeps as extras: only then are they known, and the chunks before are the
plain OpenAI ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from assist.errors import BadRequest
from assist.fanout import gather

__all__ = ["finish_reason", "stream_progress", "stream_strategies", "total_usage", "traced"]

Guard = Callable[[Awaitable[Any]], Awaitable[Any]]  # runs an awaitable, cancelled if the client leaves


def stream_progress(extra: Mapping[str, Any] | None) -> bool:
    """The request's ``stream_progress`` field (False when absent); anything but a bool is a 400."""
    value = (extra or {}).get("stream_progress", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"stream_progress must be true or false, not {str(value)[:40]!r}",
                         param="stream_progress")
    return value


async def _events(run: Any, model: Any, messages: list[dict[str, Any]], progress: bool) -> AsyncGenerator[Any]:
    """The run's events; a strategy object without ``stream`` (a custom resolver's) answers
    whole, as one delta and its result."""
    stream = getattr(run, "stream", None)
    if stream is not None:
        async with contextlib.aclosing(stream(model, messages, progress=progress)) as events:
            async for event in events:
                yield event
        return
    result = await run.run(model, messages)
    yield _Whole("delta", text=result.message.content or "")
    yield _Whole("done", result=result)


def finish_reason(message: Mapping[str, Any]) -> str:
    """A strategy answer's finish reason: it hands tool calls to the client, or it stopped."""
    return "tool_calls" if message.get("tool_calls") else "stop"


def total_usage(results: Sequence[Any]) -> dict[str, int]:
    """The choices' usage summed, with the model calls their strategies made."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "calls": 0}
    for result in results:
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            usage[key] += int(getattr(result.usage, key))
        usage["calls"] += int(getattr(result, "calls", 0) or getattr(result.usage, "calls", 0) or 0)
    return usage


def traced(result: Any) -> dict[str, Any]:
    """A choice's ``return_trace`` fields: the strategy's trace, its extracted answer and its
    cost (latency included), as plain JSON (a tool's result or a plugin's note may hold
    values JSON cannot carry; they travel as their ``str``)."""
    cost = result.usage.to_dict() if hasattr(result.usage, "to_dict") else {}
    trace = json.loads(json.dumps(list(getattr(result, "trace", None) or []), default=str))
    return {"trace": trace, "answer": getattr(result, "answer", None), "cost": cost}


class _Whole:
    def __init__(self, kind: str, **fields: Any) -> None:
        self.kind = kind
        self.__dict__.update(fields)


async def stream_strategies(runs: Sequence[Any], model: Any, messages: list[dict[str, Any]], *, name: str,
                            progress: bool, include_usage: bool, guard: Guard,
                            trace: bool = False) -> AsyncGenerator[dict[str, Any]]:
    """``chat.completion.chunk`` dicts for the runs (choice i: ``runs[i]``) as they answer;
    with ``trace`` each choice's last chunk carries its :func:`traced` fields.

    Nothing is sent before a run has something to say, so a failure that comes first is an
    ordinary HTTP error; ``guard`` watches the client until then (afterwards the HTTP layer
    does, cancelling this generator). However it ends, early or not, every run still going
    is cancelled with every call it has pending.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, run: Any) -> None:
        async for event in _events(run, model, messages, progress):
            queue.put_nowait((index, event))

    # fanout.gather: the first run to fail cancels its siblings before the error comes out.
    everything = asyncio.ensure_future(gather(*(pump(i, run) for i, run in enumerate(runs))))

    async def next_event() -> tuple[int, Any] | None:
        while queue.empty():
            if everything.done():
                everything.result()  # raises what failed a run
                return None
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter, everything}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                getter.cancel()
            if getter.done() and not getter.cancelled():
                return getter.result()
        return queue.get_nowait()

    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": name}
    opened: set[int] = set()
    results: list[Any] = []

    def content(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if index not in opened:  # each choice opens with its role
            opened.add(index)
            delta = {"role": "assistant", "content": "", **delta}
        return {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

    try:
        item = await guard(next_event())
        while item is not None:
            index, event = item
            if event.kind == "delta" and event.text:
                yield content(index, {"content": event.text})
            elif event.kind == "progress":
                yield {**base, "choices": [], "progress": {"index": index, **event.data}}
            elif event.kind == "done":
                result = event.result
                message = result.message.model_dump(exclude_none=True)
                if message.get("tool_calls"):
                    yield content(index, {"tool_calls": [{**tc, "index": j}
                                                         for j, tc in enumerate(message["tool_calls"])]})
                last = content(index, {}, finish_reason(message))
                if trace:
                    last["choices"][0].update(traced(result))
                yield last
                results.append(result)
            item = await next_event()
        if include_usage:
            yield {**base, "choices": [], "usage": total_usage(results)}
    finally:
        if not everything.done():
            everything.cancel()
            # Inside a cancelled response the wait may itself be cut short; the runs have
            # their cancellation either way.
            with contextlib.suppress(asyncio.CancelledError):
                await everything
