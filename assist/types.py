"""The OpenAI chat schema as pydantic models: what every ChatModel returns.

Field names and shapes follow OpenAI's API, so a response from our engines, from vLLM or
from OpenAI itself parses into the same objects, and ours serialise into what the official
``openai`` client expects. Unknown fields are kept (servers add their own).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletion",
    "Choice",
    "ChoiceLogprobs",
    "FunctionCall",
    "Message",
    "PromptTokensDetails",
    "TokenLogprob",
    "ToolCall",
    "TopLogprob",
    "Usage",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Model):
    name: str
    arguments: str  # a JSON string, as OpenAI sends it


class ToolCall(_Model):
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Model):
    content: list[TokenLogprob] | None = None


class Choice(_Model):
    index: int = 0
    message: Message
    finish_reason: str | None = "stop"
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(_Model):
    cached_tokens: int = 0  # prompt tokens read from a prefix cache rather than computed


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # OpenAI's; None: not reported

    def __add__(self, other: Usage) -> Usage:
        details = [u.prompt_tokens_details for u in (self, other) if u.prompt_tokens_details is not None]
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(d.cached_tokens for d in details))
            if details else None,
        )


class ChatCompletion(_Model):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = ""
    choices: list[Choice]
    usage: Usage = Field(default_factory=Usage)

    @property
    def text(self) -> str:
        """The first choice's content ('' when it only called tools)."""
        return self.choices[0].message.content or "" if self.choices else ""

    def texts(self) -> list[str]:
        return [c.message.content or "" for c in self.choices]

    def to_openai(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
