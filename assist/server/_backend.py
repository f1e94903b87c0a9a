"""What the endpoint serves from: the in-process torch engine, or an upstream server.

Both backends take validated requests and return OpenAI-shaped dicts, so the serving layer
never branches on where tokens come from. The engine backend translates requests into
engine calls; the upstream backend forwards them (vLLM, llama.cpp, OpenAI, another
``assist serve``) with our client's retries and replica spreading, rewriting only the
model name. Each also exposes ``model``, the plain ChatModel strategies run against.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from assist._protocol import ChatModel
from assist.server._protocol import ChatRequest, CompletionRequest, TokenizeRequest, chat_options

__all__ = ["Backend", "EngineBackend", "UpstreamBackend"]


class Backend(Protocol):
    model: ChatModel
    context_length: int | None

    async def chat(self, req: ChatRequest) -> dict[str, Any]: ...
    def stream_chat(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]: ...
    async def complete(self, req: CompletionRequest) -> dict[str, Any]: ...
    def stream_complete(self, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]: ...
    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]: ...
    def gauges(self) -> dict[str, float]: ...
    async def aclose(self) -> None: ...


def _messages(req: ChatRequest | TokenizeRequest) -> list[dict[str, Any]]:
    return [m.to_dict() for m in req.messages or []]


class EngineBackend:
    """Serve from an in-process engine (the torch engine's extended interface)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model: ChatModel = engine
        self.context_length: int | None = getattr(engine, "context_length", None)

    def _chat_kwargs(self, req: ChatRequest) -> dict[str, Any]:
        kw = chat_options(req)
        kw.setdefault("temperature", 1.0)  # OpenAI's default when the field is absent
        if req.top_k and req.top_k > 0:
            kw["top_k"] = req.top_k
        if req.top_logprobs:
            kw["top_logprobs"] = req.top_logprobs
        if req.tool_choice is not None and req.tools:
            kw["tool_choice"] = req.tool_choice
        if req.tool_choice == "none":
            kw.pop("tools", None)
        if req.ignore_eos:
            kw["ignore_eos"] = True
        return kw

    async def chat(self, req: ChatRequest) -> dict[str, Any]:
        completion = await self.engine.chat(_messages(req), **self._chat_kwargs(req))
        return completion.to_openai()

    async def stream_chat(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        stream = self.engine.stream_chat(_messages(req), include_usage=req.include_usage,
                                         **self._chat_kwargs(req))
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # a client that left cancels its generation

    def _complete_kwargs(self, req: CompletionRequest) -> dict[str, Any]:
        kw: dict[str, Any] = {"n": req.n, "temperature": 1.0 if req.temperature is None else req.temperature,
                              "echo": req.echo, "logprobs": req.logprobs}
        for key in ("top_p", "seed", "stop", "max_tokens"):
            if getattr(req, key) is not None:
                kw[key] = getattr(req, key)
        if req.top_k and req.top_k > 0:
            kw["top_k"] = req.top_k
        if req.ignore_eos:
            kw["ignore_eos"] = True
        return kw

    async def complete(self, req: CompletionRequest) -> dict[str, Any]:
        prompts = req.prompts()
        kw = self._complete_kwargs(req)
        results = await asyncio.gather(*(self.engine.complete(p, **kw) for p in prompts))
        merged = dict(results[0])
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for i, result in enumerate(results):
            for choice in result["choices"]:  # OpenAI numbers choices prompt-major
                choices.append({**choice, "index": i * req.n + choice["index"]})
            for key in usage:
                usage[key] += result["usage"][key]
        merged.update(choices=choices, usage=usage)
        return merged

    async def stream_complete(self, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        prompts = req.prompts()
        if len(prompts) != 1:
            from assist.errors import BadRequest

            raise BadRequest("streaming takes one prompt", param="prompt")
        stream = self.engine.stream_complete(prompts[0], include_usage=req.include_usage,
                                             **self._complete_kwargs(req))
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        if req.messages is not None:
            tokens = self.engine.encode(_messages(req))
        else:
            tokens = self.engine.tokenize(req.prompt or "")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.context_length}

    def gauges(self) -> dict[str, float]:
        sched = getattr(self.engine, "scheduler", None)
        if sched is None:
            return {}
        return {"queue_depth": sched.queue_depth, "running_sequences": sched.running}

    async def aclose(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


class UpstreamBackend:
    """Forward to OpenAI-compatible servers through :class:`assist.RemoteChatModel`.

    ``owned`` is closed with the backend (a vLLM child process we started, say).
    """

    def __init__(self, remote: Any, *, context_length: int | None = None, owned: Any = None) -> None:
        self.remote = remote
        self.model: ChatModel = remote
        self.context_length = context_length
        self.owned = owned

    def _body(self, req: ChatRequest | CompletionRequest) -> dict[str, Any]:
        body = req.model_dump(exclude_unset=True, exclude={"strategy"})
        body["model"] = self.remote.model
        return body

    async def chat(self, req: ChatRequest) -> dict[str, Any]:
        return await self.remote.post("/v1/chat/completions", self._body(req))

    async def stream_chat(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self.remote.stream("/v1/chat/completions", self._body(req)):
            yield chunk

    async def complete(self, req: CompletionRequest) -> dict[str, Any]:
        return await self.remote.post("/v1/completions", self._body(req))

    async def stream_complete(self, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self.remote.stream("/v1/completions", self._body(req)):
            yield chunk

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        body = req.model_dump(exclude_unset=True)
        body["model"] = self.remote.model
        return await self.remote.post("/tokenize", body)

    def gauges(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, r in enumerate(getattr(self.remote, "replicas", []) or []):
            stats = r if isinstance(r, dict) else vars(r)
            out[f'upstream_outstanding{{replica="{i}"}}'] = float(stats.get("outstanding", 0))
        return out

    async def aclose(self) -> None:
        await self.remote.aclose()
        if self.owned is not None:
            await asyncio.to_thread(self.owned.close)
