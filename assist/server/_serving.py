"""The endpoint's logic between the routes and a backend: routing, admission, accounting.

Model names follow ``[STRATEGY::]MODEL``: ``assistant`` is the plain model, and
``sc@8::assistant`` runs the self-consistency strategy against it. ``::`` is the separator
because it appears in no model id we know of (Hugging Face ids use ``/``, ``-`` and ``.``;
Ollama tags a single ``:``). The extra body field ``"strategy": "sc@8"`` does the same.

Admission is bounded: beyond ``max_in_flight`` accepted requests the answer is 429 with
``Retry-After``; an accepted request is always answered (or cancelled because its client
left, which frees its engine slots).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from assist.errors import AssistError, BadRequest, NotFound, Overloaded
from assist.server._backend import Backend
from assist.server._metrics import Metrics
from assist.server._protocol import ChatRequest, CompletionRequest

__all__ = ["SEPARATOR", "ClientGone", "Serving", "StrategyResolver", "split_model"]

T = TypeVar("T")
SEPARATOR = "::"
StrategyResolver = Callable[[str], Any]  # spec -> an object with `async run(model, messages)`


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its work was cancelled."""


def split_model(name: str | None) -> tuple[str | None, str | None]:
    """``"sc@8::assistant"`` → ``("sc@8", "assistant")``; ``"assistant"`` → ``(None, "assistant")``."""
    if name and SEPARATOR in name:
        spec, _, model = name.partition(SEPARATOR)
        return spec or None, model or None
    return None, name


def _default_resolver(spec: str) -> Any:
    try:
        import strategies
    except ImportError as exc:  # the core install may lack the strategies package
        raise NotFound(f"strategies are not installed (asked for {spec!r})", param="strategy") from exc
    try:
        return strategies.parse(spec)
    except ValueError as exc:
        raise NotFound(f"unknown strategy {spec!r}: {exc}", param="strategy",
                       code="strategy_not_found") from exc


class Serving:
    def __init__(
        self, backend: Backend, *, names: Sequence[str] = ("assistant",), max_in_flight: int = 256,
        resolver: StrategyResolver | None = None, strategy_aliases: Sequence[str] = (),
    ) -> None:
        self.backend = backend
        self.names = list(names)
        self.max_in_flight = max_in_flight
        self.resolver = resolver or _default_resolver
        self.strategy_aliases = list(strategy_aliases)
        self.metrics = Metrics()
        self.started = int(time.time())

    # -- admission ------------------------------------------------------------------------
    def _admit(self) -> None:
        if self.metrics.in_flight >= self.max_in_flight:
            self.metrics.rejected += 1
            raise Overloaded(f"the server is at capacity ({self.max_in_flight} requests in flight); retry shortly",
                             retry_after=1.0)
        self.metrics.in_flight += 1

    def _release(self) -> None:
        self.metrics.in_flight -= 1

    async def _guarded(self, request: Request, work: Awaitable[T]) -> T:
        """Run ``work``; cancel it if the client disconnects first."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task.done():
            return task.result()
        task.cancel()
        self.metrics.cancelled += 1
        raise ClientGone

    # -- routing ----------------------------------------------------------------------------
    def route(self, model: str | None, strategy: str | None) -> tuple[str, Any | None]:
        """(model name to report, strategy object or None) for a request."""
        spec, name = split_model(model)
        if spec and strategy and spec != strategy:
            raise BadRequest(f"the model name asks for strategy {spec!r} but the body for {strategy!r}",
                             param="strategy")
        spec = spec or strategy
        name = name or self.names[0]
        if name not in self.names:
            raise NotFound(f"The model `{name}` does not exist. Served: {', '.join(self.names)}",
                           param="model", code="model_not_found")
        return name, (self.resolver(spec) if spec else None)

    # -- routes -----------------------------------------------------------------------------
    async def chat(self, req: ChatRequest, request: Request) -> dict[str, Any] | AsyncIterator[bytes]:
        name, strategy = self.route(req.model, req.strategy)
        self._admit()
        if req.stream:
            if strategy is not None:
                source = self._strategy_stream(strategy, req, name, request)
            else:
                source = self.backend.stream_chat(req)
            return await self._sse(source, name)
        work = self._run_strategy(strategy, req, name) if strategy is not None else self.backend.chat(req)
        return await self._answer(request, work, name)

    async def complete(self, req: CompletionRequest, request: Request) -> dict[str, Any] | AsyncIterator[bytes]:
        name, strategy = self.route(req.model, req.strategy)
        if strategy is not None:
            raise BadRequest("strategies run on chat; use /v1/chat/completions", param="strategy")
        self._admit()
        if req.stream:
            return await self._sse(self.backend.stream_complete(req), name)
        return await self._answer(request, self.backend.complete(req), name)

    async def _answer(self, request: Request, work: Awaitable[dict[str, Any]], name: str) -> dict[str, Any]:
        """A whole (non-streamed) answer: run it until done or the client leaves, release the
        admission slot, name the model as the client asked for it, count its tokens."""
        try:
            body = await self._guarded(request, work)
        finally:
            self._release()
        body["model"] = name
        self.metrics.count_usage(body.get("usage"))
        return body

    def models(self) -> dict[str, Any]:
        ids = self.names[:1] + [f"{spec}{SEPARATOR}{self.names[0]}" for spec in self.strategy_aliases]
        data = [{"id": i, "object": "model", "created": self.started, "owned_by": "assist",
                 "root": self.names[0], "max_model_len": self.backend.context_length} for i in ids]
        return {"object": "list", "data": data}

    # -- strategies -------------------------------------------------------------------------
    async def _run_strategy(self, strategy: Any, req: ChatRequest, name: str) -> dict[str, Any]:
        """The strategy keeps its own sampling (from its spec); the request's ``max_tokens``
        caps each of its calls and its ``seed`` seeds it (choice i: seed + i)."""
        from strategies._base import with_fields

        messages = [m.to_dict() for m in req.messages]

        def configured(i: int) -> Any:
            changes: dict[str, Any] = {}
            if req.limit is not None:
                changes["max_tokens"] = req.limit
            if req.seed is not None:
                changes["seed"] = req.seed + i
            return with_fields(strategy, lambda node: changes) if changes else strategy

        results = await asyncio.gather(*(configured(i).run(self.backend.model, messages) for i in range(req.n)))
        choices, usage, calls = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, 0
        for i, result in enumerate(results):
            message = result.message.model_dump(exclude_none=True)
            finish = "tool_calls" if message.get("tool_calls") else "stop"
            choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": None})
            for key in usage:
                usage[key] += int(getattr(result.usage, key))
            calls += int(getattr(result, "calls", 0) or getattr(result.usage, "calls", 0) or 0)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": {**usage, "calls": calls},
                "strategy": getattr(strategy, "spec", None) or req.strategy}

    async def _strategy_stream(self, strategy: Any, req: ChatRequest, name: str,
                               request: Request) -> AsyncIterator[dict[str, Any]]:
        """A strategy answers as a whole; its answer is sent as one content delta per choice."""
        body = await self._run_strategy(strategy, req, name)
        base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": name}
        for c in body["choices"]:
            delta = {"role": "assistant", "content": c["message"].get("content") or ""}
            if c["message"].get("tool_calls"):
                delta["tool_calls"] = [{**tc, "index": j} for j, tc in enumerate(c["message"]["tool_calls"])]
            yield {**base, "choices": [{"index": c["index"], "delta": delta, "finish_reason": None}]}
            yield {**base, "choices": [{"index": c["index"], "delta": {}, "finish_reason": c["finish_reason"]}]}
        if req.include_usage:
            yield {**base, "choices": [], "usage": body["usage"]}

    # -- server-sent events -----------------------------------------------------------------
    async def _sse(self, source: AsyncIterator[dict[str, Any]], name: str) -> AsyncIterator[bytes]:
        """Start the stream (errors before the first chunk are ordinary HTTP errors), then
        relay chunks as SSE; an error mid-stream becomes an ``error`` event."""
        try:
            first = await source.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            self._release()
            await _close(source)
            raise
        return self._events(source, first, name)

    async def _events(self, source: AsyncIterator[dict[str, Any]], first: dict[str, Any] | None,
                      name: str) -> AsyncIterator[bytes]:
        finished = False
        try:
            if first is not None:
                yield self._event(first, name)
                async for chunk in source:
                    yield self._event(chunk, name)
            finished = True
        except AssistError as exc:
            finished = True
            yield f"data: {json.dumps(exc.to_openai())}\n\n".encode()
        finally:
            if not finished:  # the client went away: the generator was closed mid-stream
                self.metrics.cancelled += 1
            self._release()
            await _close(source)
        yield b"data: [DONE]\n\n"

    def _event(self, chunk: dict[str, Any], name: str) -> bytes:
        chunk["model"] = name
        self.metrics.count_usage(chunk.get("usage"))
        return f"data: {json.dumps(chunk)}\n\n".encode()


async def _close(source: AsyncIterator[Any]) -> None:
    aclose: Callable[[], Awaitable[None]] | None = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()
