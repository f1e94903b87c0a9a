"""The one interface strategies talk to: an async chat call in OpenAI's terms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from assist.types import ChatCompletion

__all__ = ["ChatModel", "Messages"]

Messages = Sequence[Mapping[str, Any]]


@runtime_checkable
class ChatModel(Protocol):
    """Anything that answers chats: the torch engine, vLLM, a remote server, a fake.

    ``n`` completions share one prompt; ``temperature=0`` is greedy. Implementations
    report ``usage`` for the whole call, and say in ``supports_n`` whether one call with
    ``n > 1`` really samples ``n`` times (else callers make ``n`` calls).
    """

    name: str
    supports_n: bool

    async def chat(
        self,
        messages: Messages,
        *,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None,
        logprobs: bool = False,
    ) -> ChatCompletion: ...
