"""Streaming for the torch engine: scheduler token events as OpenAI chunks, and legacy logprobs.

The scheduler thread reports every sampled token through ``on_token``; :func:`_events`
hands snapshots to the event loop through a queue. A :class:`_Gate` per choice decides how
much of the decoded text is safe to send: never a tail that may still grow into a stop
string (or a Hermes ``<tool_call>``, which is sent as ``tool_calls`` at the end instead),
never an incomplete UTF-8 character (decoded as U+FFFD). Closing or cancelling a stream
cancels its request, which frees its batch slots on the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from assist.chat_format import TOOL_CALL_START
from assist.engine._grammar import parse_calls
from assist.engine._scheduler import RequestOutput, SamplingParams, SeqOutput, TokenIdLogprob
from assist.errors import AssistError

if TYPE_CHECKING:
    from assist.engine._torch import TorchEngine

__all__ = ["chat_chunks", "completion_chunks", "legacy_logprobs"]


@dataclass(frozen=True)
class _Event:
    """One choice's state right after a token (a snapshot: the scheduler mutates its output)."""

    index: int
    text: str
    finish_reason: str | None
    tokens: int
    logprob: TokenIdLogprob | None
    prompt_logprobs: list[TokenIdLogprob | None] | None


_DONE = object()


async def _events(engine: TorchEngine, prompt: list[int], params: SamplingParams,
                  ) -> AsyncIterator[_Event | RequestOutput | None]:
    """``None`` once queued, then one event per token, then the request's output."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def on_token(token: int, out: SeqOutput) -> None:
        lp = out.logprobs[-1] if params.logprobs and out.logprobs else None
        event = _Event(out.index, out.text, out.finish_reason, len(out.token_ids), lp, out.prompt_logprobs)
        loop.call_soon_threadsafe(queue.put_nowait, event)

    def on_done(_: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    future = engine.scheduler.submit(prompt, params, on_token)
    future.add_done_callback(on_done)
    try:
        yield None
        while (item := await queue.get()) is not _DONE:
            yield item
        if future.cancelled():
            raise AssistError("the engine shut down during the request")
        yield future.result()  # raises what failed the request
    finally:
        future.cancel()  # a consumer that left frees the slots (a no-op once done)


@functools.lru_cache(maxsize=256)
def _borders(marker: str) -> tuple[int, ...]:
    """KMP's prefix function: entry k is the longest proper border of ``marker[:k + 1]``."""
    fail = [0] * len(marker)
    k = 0
    for i in range(1, len(marker)):
        while k and marker[i] != marker[k]:
            k = fail[k - 1]
        if marker[i] == marker[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


def _held_tail(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some marker."""
    tail = _Tail(markers)
    tail.feed(text, len(text))
    return tail.held()


class _Tail:
    """The longest suffix of a growing text that is a proper prefix of a marker, kept up to date
    one character at a time (a KMP automaton per marker): a step costs the new characters,
    never the markers' lengths, however long the stop strings."""

    def __init__(self, markers: Sequence[str]) -> None:
        self.markers = [(m, _borders(m)) for m in dict.fromkeys(markers) if m]
        self.states = [0] * len(self.markers)
        self.fed = 0

    def feed(self, text: str, upto: int) -> None:
        """Advance over ``text[self.fed:upto]``."""
        if upto < self.fed:  # the text shrank (it never does): start over
            self.states, self.fed = [0] * len(self.markers), 0
        for j, (m, fail) in enumerate(self.markers):
            k, n, i = self.states[j], len(m), self.fed
            while i < upto:
                if k == 0:  # skip to the next place the marker could start
                    i = text.find(m[0], i, upto)
                    if i < 0:
                        break
                c = text[i]
                while k == n or (k and m[k] != c):
                    k = fail[k - 1]
                if m[k] == c:
                    k += 1
                i += 1
            self.states[j] = k
        self.fed = upto

    def held(self) -> int:
        best = 0
        for (m, fail), k in zip(self.markers, self.states, strict=True):
            best = max(best, k if k < len(m) else fail[k - 1])
        return best


class _Gate:
    """How much of one choice's text may be sent so far."""

    def __init__(self, stops: Sequence[str], tools: bool) -> None:
        self.cut = (TOOL_CALL_START,) if tools else ()
        self.markers = tuple(stops) + self.cut
        self.tail = _Tail(self.markers)
        self.sent = 0

    def step(self, text: str) -> str:
        # An incomplete UTF-8 character decodes as U+FFFD and changes with the next token: the
        # settled text ends before it.
        settled = len(text)
        while settled > 0 and text[settled - 1] == "\ufffd":
            settled -= 1
        self.tail.feed(text, settled)
        end = settled
        for m in self.cut:  # from a tool call on, everything waits for the parser
            i = text.find(m, self.sent)
            if i >= 0:
                end = min(end, i)
        if end == settled:
            end -= self.tail.held()
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def rest(self, text: str) -> str:
        delta = text[self.sent:]
        self.sent = len(text)
        return delta


async def chat_chunks(engine: TorchEngine, prompt: list[int], params: SamplingParams, *, parse: bool,
                      include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: list[TokenIdLogprob] | None = None) -> dict[str, Any]:
        lp = {"content": [t.model_dump() for t in engine.chat_logprobs(logprobs)]} if logprobs else None
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        return {**body, "usage": None} if include_usage else body

    gates = [_Gate(params.stop, parse) for _ in range(params.n)]
    pending: list[list[TokenIdLogprob]] = [[] for _ in range(params.n)]
    done: set[int] = set()
    used = [0] * params.n
    cached = 0
    async with contextlib.aclosing(_events(engine, prompt, params)) as events:
        async for ev in events:
            if ev is None:  # queued: each choice opens with its role
                for i in range(params.n):
                    yield chunk(i, {"role": "assistant", "content": ""})
                continue
            if isinstance(ev, RequestOutput):  # outputs that never produced a token (max_tokens=0)
                cached = ev.cached_tokens
                for out in ev.outputs:
                    if out.index not in done:
                        yield chunk(out.index, {}, out.finish_reason or "length")
                break
            i, lps = ev.index, pending[ev.index]
            used[i] = ev.tokens
            if ev.logprob is not None:
                lps.append(ev.logprob)
            if ev.finish_reason is None:
                delta = gates[i].step(ev.text)
                if delta:
                    yield chunk(i, {"content": delta}, logprobs=lps[:])
                    lps.clear()
                continue
            done.add(i)
            rest = gates[i].rest(ev.text)
            content, calls = parse_calls(rest) if parse else (rest, [])
            if content:
                yield chunk(i, {"content": content}, logprobs=lps[:])
                lps.clear()
            if calls:
                tool_calls = [{"index": j, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                               "function": {"name": c["name"], "arguments": c["arguments"]}}
                              for j, c in enumerate(calls)]
                yield chunk(i, {"tool_calls": tool_calls}, logprobs=lps[:])
                lps.clear()
            yield chunk(i, {}, "tool_calls" if calls else ev.finish_reason, logprobs=lps[:])
    if include_usage:
        usage = {"prompt_tokens": len(prompt), "completion_tokens": sum(used),
                 "total_tokens": len(prompt) + sum(used), "prompt_tokens_details": {"cached_tokens": cached}}
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
               "choices": [], "usage": usage}


def legacy_logprobs(engine: TorchEngine, prompt_lp: Sequence[TokenIdLogprob | None] | None,
                    prompt_ids: Sequence[int], generated: Sequence[TokenIdLogprob],
                    offset: int) -> dict[str, Any]:
    """The legacy ``logprobs`` object; ``prompt_lp`` (echo) puts the prompt's tokens first."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    entries: list[tuple[int, TokenIdLogprob | None]] = []
    if prompt_lp is not None:
        entries += list(zip(prompt_ids, prompt_lp, strict=True))
    entries += [(t.token_id, t) for t in generated]
    for token_id, entry in entries:
        piece = engine.piece(token_id)
        tokens.append(piece)
        values.append(None if entry is None else entry.logprob)
        tops.append(None if entry is None else {engine.piece(i): v for i, v in entry.top})
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


async def completion_chunks(engine: TorchEngine, prompt: list[int], echo: str | None,
                            params: SamplingParams, *, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    want = params.logprobs

    def chunk(index: int, text: str, finish: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"id": cid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        return {**body, "usage": None} if include_usage else body

    gates = [_Gate(params.stop, False) for _ in range(params.n)]
    pending: list[list[TokenIdLogprob]] = [[] for _ in range(params.n)]
    offsets = [0] * params.n
    opened: set[int] = set()
    used = [0] * params.n
    cached = 0

    def emit(i: int, text: str, finish: str | None = None,
             prompt_lp: Sequence[TokenIdLogprob | None] | None = None) -> dict[str, Any]:
        lp = None
        if want:
            lp = legacy_logprobs(engine, prompt_lp, prompt, pending[i], offsets[i])
            offsets[i] += sum(len(t) for t in lp["tokens"])
            pending[i].clear()
        return chunk(i, text, finish, lp)

    def open_(i: int, prompt_lp: Sequence[TokenIdLogprob | None] | None) -> dict[str, Any] | None:
        opened.add(i)
        if echo is None:
            return None
        return emit(i, echo, prompt_lp=prompt_lp if params.prompt_logprobs is not None else None)

    async with contextlib.aclosing(_events(engine, prompt, params)) as events:
        async for ev in events:
            if ev is None:
                continue
            if isinstance(ev, RequestOutput):  # max_tokens=0: the echo (and its scores) is all
                cached = ev.cached_tokens
                for out in ev.outputs:
                    if out.index not in opened and (first := open_(out.index, ev.prompt_logprobs)):
                        yield first
                    if not out.token_ids:
                        yield chunk(out.index, "", out.finish_reason or "length")
                break
            i = ev.index
            if i not in opened and (first := open_(i, ev.prompt_logprobs)):
                yield first
            used[i] = ev.tokens
            if ev.logprob is not None:
                pending[i].append(ev.logprob)
            if ev.finish_reason is None:
                if delta := gates[i].step(ev.text):
                    yield emit(i, delta)
                continue
            yield emit(i, gates[i].rest(ev.text), ev.finish_reason)
    if include_usage:
        usage = {"prompt_tokens": len(prompt), "completion_tokens": sum(used),
                 "total_tokens": len(prompt) + sum(used), "prompt_tokens_details": {"cached_tokens": cached}}
        yield {"id": cid, "object": "text_completion", "created": created, "model": engine.name,
               "choices": [], "usage": usage}
