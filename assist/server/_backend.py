"""What the endpoint serves from: the in-process torch engine, or an upstream server.

Both backends take validated requests and return OpenAI-shaped dicts, so the serving layer
never branches on where tokens come from. The engine backend translates requests into
engine calls; the upstream backend forwards them (vLLM, llama.cpp, OpenAI, another
``assist serve``) with our client's retries and replica spreading, rewriting only the
model name. Each also exposes ``model``, the plain ChatModel strategies run against.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, cast

from assist.errors import BadRequest, ContextLengthExceeded
from assist.fanout import gather
from assist.protocol import ChatModel, Messages
from assist.server._protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_options,
    refuse_unsupported,
    vllm_sampling,
)
from assist.types import ChatCompletion

__all__ = ["Backend", "EngineBackend", "OffloadedEngine", "TextLimits", "UpstreamBackend"]


class Backend(Protocol):
    model: ChatModel
    context_length: int | None

    async def chat(self, req: ChatRequest) -> dict[str, Any]: ...
    def stream_chat(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]: ...
    async def complete(self, req: CompletionRequest) -> dict[str, Any]: ...
    def stream_complete(self, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]: ...
    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]: ...
    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]: ...
    async def tokenizer_info(self) -> dict[str, Any]: ...
    def gauges(self) -> dict[str, float]: ...
    async def aclose(self) -> None: ...


def _messages(req: ChatRequest | TokenizeRequest) -> list[dict[str, Any]]:
    return [m.to_dict() for m in req.messages or []]


def _longest_token(engine: Any) -> int | None:
    """The most characters one token of ``engine``'s tokenizer can stand for: the longest
    vocabulary entry (a byte-level entry spells one byte per character, so its text is never
    longer). None when the engine has no Hugging Face tokenizer."""
    try:
        vocab = engine.tokenizer.get_vocab()
        return max(1, max(len(piece) for piece in vocab))
    except Exception:  # noqa: BLE001 - no tokenizer, or one without a vocabulary
        return None


class TextLimits:
    """Cheap checks, before any tokenizing, that text can fit the context at all: a prompt of
    C characters has at least C / longest-token tokens, and every message at least one. A
    body that fails them is refused in microseconds instead of tokenized for seconds."""

    def __init__(self, context_length: int | None, longest_token: int | None) -> None:
        self.context_length = context_length
        self.max_chars = context_length * longest_token if context_length and longest_token else None

    def _refuse(self, what: str, size: str) -> None:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {self.context_length} tokens. However, your {what} "
            f"({size}) cannot fit it. Please reduce the length of the {what}.", param=what)

    def text(self, text: str, what: str) -> None:
        if self.max_chars is not None and len(text) > self.max_chars:
            self._refuse(what, f"{len(text)} characters")

    def ids(self, ids: Sequence[int], what: str) -> None:
        if self.context_length is not None and len(ids) > self.context_length:
            self._refuse(what, f"{len(ids)} tokens")

    def messages(self, messages: Sequence[Mapping[str, Any]], what: str = "messages") -> None:
        if self.context_length is None:
            return
        if len(messages) > self.context_length:
            self._refuse(what, f"{len(messages)} messages")
        if self.max_chars is not None:
            chars = sum(len(c) for m in messages if isinstance(c := m.get("content"), str))
            if chars > self.max_chars:
                self._refuse(what, f"{chars} characters")


class OffloadedEngine:
    """The engine as a ChatModel that checks prompts against :class:`TextLimits` first and
    never prepares one on the event loop: ``chat`` and ``complete`` are the torch engine's own,
    which prepare (template, tokenizing, grammar compiling) in a worker thread; the streams'
    preparation, which the engine does when the stream is created, and ``/tokenize`` run in a
    worker here. Every other attribute is the engine's. Strategies run against this too."""

    def __init__(self, engine: Any, limits: TextLimits) -> None:
        self.engine = engine
        self.limits = limits

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def check_prompt(self, prompt: str | list[int]) -> None:
        if isinstance(prompt, str):
            self.limits.text(prompt, "prompt")
        else:
            self.limits.ids(prompt, "prompt")

    async def chat(self, messages: Messages, **kw: Any) -> ChatCompletion:
        self.limits.messages(messages)
        return cast(ChatCompletion, await self.engine.chat(messages, **kw))

    async def stream_chat(self, messages: Messages, **kw: Any) -> AsyncIterator[dict[str, Any]]:
        self.limits.messages(messages)
        stream: AsyncIterator[dict[str, Any]] = await asyncio.to_thread(self.engine.stream_chat, messages, **kw)
        return stream

    async def complete(self, prompt: str | list[int], **kw: Any) -> dict[str, Any]:
        self.check_prompt(prompt)
        return cast(dict[str, Any], await self.engine.complete(prompt, **kw))

    async def stream_complete(self, prompt: str | list[int], **kw: Any) -> AsyncIterator[dict[str, Any]]:
        self.check_prompt(prompt)
        stream: AsyncIterator[dict[str, Any]] = await asyncio.to_thread(self.engine.stream_complete, prompt, **kw)
        return stream

    async def tokenize(self, req: TokenizeRequest) -> list[int]:
        if req.messages is not None:
            if req.add_special_tokens:
                raise BadRequest("add_special_tokens is not supported with messages: the chat template "
                                 "writes the special tokens", param="add_special_tokens")
            messages = _messages(req)
            self.limits.messages(messages)
            return cast(list[int], await asyncio.to_thread(self.engine.encode, messages))
        prompt = req.prompt or ""
        self.limits.text(prompt, "prompt")
        if req.add_special_tokens is False:  # vLLM's default for a prompt is true
            return cast(list[int], await asyncio.to_thread(self.engine.tokenize, prompt, False))
        return cast(list[int], await asyncio.to_thread(self.engine.tokenize, prompt))


class EngineBackend:
    """Serve from an in-process engine (the torch engine's extended interface).

    Prompts are checked against the context cheaply first, then prepared and tokenized in a
    worker thread (:class:`OffloadedEngine`); ``model`` is that wrapper, so strategies get
    the same protection.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.context_length: int | None = getattr(engine, "context_length", None)
        self.limits = TextLimits(self.context_length, _longest_token(engine))
        self.offloaded = OffloadedEngine(engine, self.limits)
        self.model: ChatModel = cast(ChatModel, self.offloaded)

    def _chat_kwargs(self, req: ChatRequest) -> dict[str, Any]:
        refuse_unsupported(req)  # a field this engine would otherwise ignore
        kw = chat_options(req) | vllm_sampling(req)
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
        completion = await self.offloaded.chat(_messages(req), **self._chat_kwargs(req))
        return completion.to_openai()

    async def stream_chat(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        stream = await self.offloaded.stream_chat(_messages(req), include_usage=req.include_usage,
                                                  **self._chat_kwargs(req))
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # a client that left cancels its generation

    def _complete_kwargs(self, req: CompletionRequest) -> dict[str, Any]:
        refuse_unsupported(req)
        kw: dict[str, Any] = {"n": req.n, "temperature": 1.0 if req.temperature is None else req.temperature,
                              "echo": req.echo, "logprobs": req.logprobs, **vllm_sampling(req)}
        if not req.add_special_tokens:
            kw["add_special_tokens"] = False
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
        for p in prompts:  # all of them before any work starts
            self.offloaded.check_prompt(p)
        kw = self._complete_kwargs(req)
        results = await gather(*(self.offloaded.complete(p, **kw) for p in prompts))  # one fails: all stop
        merged = dict(results[0])
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        cached = 0
        for i, result in enumerate(results):
            for choice in result["choices"]:  # OpenAI numbers choices prompt-major
                choices.append({**choice, "index": i * req.n + choice["index"]})
            for key in usage:
                usage[key] += result["usage"][key]
            cached += int((result["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        merged.update(choices=choices, usage={**usage, "prompt_tokens_details": {"cached_tokens": cached}})
        return merged

    async def stream_complete(self, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        prompts = req.prompts()
        if len(prompts) != 1:
            raise BadRequest("streaming takes one prompt", param="prompt")
        stream = await self.offloaded.stream_complete(prompts[0], include_usage=req.include_usage,
                                                      **self._complete_kwargs(req))
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        tokens = await self.offloaded.tokenize(req)
        out: dict[str, Any] = {"tokens": tokens, "count": len(tokens), "max_model_len": self.context_length}
        if req.return_token_strs:
            out["token_strs"] = list(self.engine.tokenizer.convert_ids_to_tokens(tokens))
        return out

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        vocab = getattr(self.engine, "vocab_size", None)
        if vocab is not None and any(i >= vocab for i in req.tokens):
            raise BadRequest(f"token ids must lie in [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(self.engine.detokenize, req.tokens)}

    async def tokenizer_info(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.engine.tokenizer_info())

    def gauges(self) -> dict[str, float]:
        sched = getattr(self.engine, "scheduler", None)
        if sched is None:
            return {}
        out = {"queue_depth": sched.queue_depth, "running_sequences": sched.running}
        if getattr(sched, "prefix_cache", None) is not None:  # counters, in tokens (see _metrics)
            out |= {"prefix_cache_queries": sched.prefix_queries, "prefix_cache_hits": sched.prefix_hits}
        return out

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
        # kv_transfer_params.prompt_token_ids makes vLLM skip its template and take the ids
        # as the prompt: a client must not set arbitrary ids, so the field never passes
        body = req.model_dump(exclude_unset=True, exclude={"strategy", "kv_transfer_params"})
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

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        body = req.model_dump(exclude_unset=True)
        body["model"] = self.remote.model
        return await self.remote.post("/detokenize", body)

    async def tokenizer_info(self) -> dict[str, Any]:
        """The upstream's (vLLM serves it with ``--enable-tokenizer-info-endpoint``, which the
        managed child of ``--engine vllm`` gets)."""
        return await self.remote.get("/tokenizer_info")

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
