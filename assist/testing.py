"""Test doubles shipped with the package, so users can test their own strategies.

``FakeChatModel`` answers from a script instead of a network or a model: a list of replies
consumed in order, or a function of the request. It records every call, counts usage the
way a real server would (whitespace tokens), and honours ``n``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from assist.protocol import Messages
from assist.types import ChatCompletion, Choice, FunctionCall, Message, ToolCall, Usage

__all__ = ["FakeChatModel", "Reply", "running_server", "tool_reply"]

Reply = str | Message  # a text reply, or a full message (tool calls, say)


def tool_reply(name: str, arguments: Mapping[str, Any], call_id: str | None = None) -> Message:
    """An assistant message that calls one tool."""
    call = ToolCall(function=FunctionCall(name=name, arguments=json.dumps(dict(arguments))))
    if call_id:
        call.id = call_id
    return Message(role="assistant", content=None, tool_calls=[call])


def _count(text: str | None) -> int:
    return len((text or "").split())


@dataclass
class FakeChatModel:
    """A scripted ChatModel.

    ``replies``: consumed one per completion (``n=3`` takes three); when exhausted the last
    one repeats. ``respond``: called as ``respond(messages, kwargs)`` for each completion
    instead; return a str or a Message.
    """

    replies: Sequence[Reply] = ()
    respond: Callable[[Messages, dict[str, Any]], Reply] | None = None
    name: str = "fake"
    supports_n: bool = True
    calls: list[dict[str, Any]] = field(default_factory=list)
    _next: int = 0

    async def chat(self, messages: Messages, **kwargs: Any) -> ChatCompletion:
        n = int(kwargs.get("n", 1))
        self.calls.append({"messages": [dict(m) for m in messages], **kwargs})
        choices = []
        for i in range(n):
            reply = self._reply(messages, kwargs)
            message = reply if isinstance(reply, Message) else Message(role="assistant", content=reply)
            finish = "tool_calls" if message.tool_calls else "stop"
            choices.append(Choice(index=i, message=message, finish_reason=finish))
        prompt = sum(_count(str(m.get("content") or "")) for m in messages)
        completion = sum(_count(c.message.content) + 8 * len(c.message.tool_calls or []) for c in choices)
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        return ChatCompletion(model=self.name, choices=choices, usage=usage)

    async def stream_chat(self, messages: Messages, *, include_usage: bool = False,
                          **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """The same completion as :meth:`chat` (recorded the same way), sent as OpenAI
        ``chat.completion.chunk`` dicts: each choice's text a word at a time, its tool calls
        whole, its finish reason, then the usage when ``include_usage``."""
        completion = await self.chat(messages, **kwargs)
        base = {"id": completion.id, "object": "chat.completion.chunk", "created": completion.created,
                "model": self.name}
        for choice in completion.choices:
            i = choice.index
            yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
            for piece in re.findall(r"\s*\S+\s*|\s+", choice.message.content or ""):
                await asyncio.sleep(0)  # a real stream yields to the loop between tokens
                yield {**base, "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": None}]}
            if choice.message.tool_calls:
                calls = [{"index": j, **c.model_dump()} for j, c in enumerate(choice.message.tool_calls)]
                yield {**base, "choices": [{"index": i, "delta": {"tool_calls": calls}, "finish_reason": None}]}
            yield {**base, "choices": [{"index": i, "delta": {}, "finish_reason": choice.finish_reason}]}
        if include_usage:
            yield {**base, "choices": [], "usage": completion.usage.model_dump()}

    def _reply(self, messages: Messages, kwargs: dict[str, Any]) -> Reply:
        if self.respond is not None:
            return self.respond(messages, kwargs)
        if not self.replies:
            raise RuntimeError("FakeChatModel has no replies scripted")
        reply = self.replies[min(self._next, len(self.replies) - 1)]
        self._next += 1
        return reply


@contextmanager
def running_server(app: Any, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Serve an ASGI app (e.g. ``assist.server.create_app(...)``) on a free port in a
    background thread; yields its base URL (``http://host:port``) and stops it after."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="assist-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
