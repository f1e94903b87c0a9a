"""The two things ``assist chat`` can talk to: a local checkpoint or an OpenAI-compatible server.

Either way a :class:`ChatTarget` offers a ChatModel (what strategies call) and a stream of
``chat.completion.chunk`` dicts (what plain answers print as they arrive): the torch
engine's ``stream_chat``, or the server's ``/v1/chat/completions`` with ``stream: true``.
Both constructors check what they can before the session starts, so a missing checkpoint
or an unreachable server is one line and exit 2, not a failure on the first question.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assist.errors import BadRequest

if TYPE_CHECKING:
    from rich.console import Console

    from assist.protocol import ChatModel, Messages
    from assist.types import ChatCompletion

__all__ = ["Capped", "ChatTarget", "ChatUsageError", "local_backend", "remote_backend"]

StreamFn = Callable[[list[dict[str, Any]], float, "int | None"], AsyncIterator[dict[str, Any]]]


class ChatUsageError(BadRequest):
    """A user mistake noticed after parsing (a path, a URL, a model name): exit 2."""


@dataclass
class ChatTarget:
    """What a session talks to: a ChatModel for strategies, a chunk stream for plain answers."""

    model: ChatModel
    stream: StreamFn  # (messages, temperature, max_tokens) -> chat.completion.chunk dicts
    name: str
    close: Callable[[], Any] = lambda: None  # may return an awaitable


class Capped:
    """A ChatModel that lowers every call's ``max_tokens`` to ``--max-tokens``: strategies
    set their own, and an uncapped call on a small model runs to the end of the context."""

    def __init__(self, model: ChatModel, cap: int) -> None:
        self.model, self.cap = model, cap

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def supports_n(self) -> bool:  # read through: a remote model learns it from the server
        return self.model.supports_n

    async def chat(self, messages: Messages, **kwargs: Any) -> ChatCompletion:
        asked = kwargs.get("max_tokens")
        kwargs["max_tokens"] = self.cap if asked is None else min(asked, self.cap)
        return await self.model.chat(messages, **kwargs)

    def stream_chat(self, messages: Messages, **kwargs: Any) -> Any:
        """The model's ``stream_chat``, capped the same way: a streamed strategy sends its
        final call here. What it returns (an async iterator, or an awaitable of one) is passed
        on as is; both targets' models (the torch engine, RemoteChatModel) have one."""
        asked = kwargs.get("max_tokens")
        kwargs["max_tokens"] = self.cap if asked is None else min(asked, self.cap)
        return self.model.stream_chat(messages, **kwargs)  # type: ignore[attr-defined]


def local_backend(path: str, console: Console) -> ChatTarget:
    """The torch engine over a checkpoint folder, loaded under a spinner."""
    if not (Path(path) / "config.json").is_file():  # before torch's slow import
        raise ChatUsageError(f"no Hugging Face checkpoint (config.json) in {path}")
    with console.status(f"loading {path} …"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its bars would tear through the chat's screen
        from assist.engine import TorchEngine

        engine = TorchEngine(path, max_batch=16)

    def stream(messages: list[dict[str, Any]], temperature: float,
               max_tokens: int | None) -> AsyncIterator[dict[str, Any]]:
        return engine.stream_chat(messages, temperature=temperature, max_tokens=max_tokens,
                                  include_usage=True)

    return ChatTarget(engine, stream, engine.name, engine.close)


def remote_backend(base_url: str, model_name: str | None, api_key: str | None,
                   runner: asyncio.Runner) -> ChatTarget:
    """A server's model, checked on ``/v1/models`` first (a server without the route is
    fine); the client is made for ``runner``'s loop, where the session will use it."""
    from assist._remote import RemoteChatModel, list_models
    from assist.errors import AssistError, NotFound
    from assist.server import SEPARATOR

    if not model_name:
        raise ChatUsageError("--base-url needs --model-name")
    try:
        model = RemoteChatModel(base_url, model_name, api_key, max_retries=1)
    except ValueError as exc:
        raise ChatUsageError(str(exc)) from None
    try:  # fail at start, not on the first question
        listed = list_models(base_url, api_key, timeout=15.0)
    except NotFound:
        listed = []
    except AssistError as exc:
        raise ChatUsageError(f"cannot reach {base_url}: {exc.message}") from None
    ids = {str(m.get("id")) for m in listed}
    # "sc@3::assistant" is our server's strategy alias of a listed model.
    if ids and model_name not in ids and model_name.split(SEPARATOR)[-1] not in ids:
        raise ChatUsageError(f"{base_url} serves no model {model_name!r} "
                             f"(it has: {', '.join(sorted(ids))})")

    def stream(messages: list[dict[str, Any]], temperature: float,
               max_tokens: int | None) -> AsyncIterator[dict[str, Any]]:
        body: dict[str, Any] = {"model": model_name, "messages": messages,
                                "temperature": temperature,
                                "stream_options": {"include_usage": True}}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return model.stream("/v1/chat/completions", body)

    return ChatTarget(model, stream, model_name, model.aclose)
