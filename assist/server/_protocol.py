"""Request bodies of the OpenAI-compatible endpoint, validated with pydantic.

Unknown fields are accepted and ignored (lm-eval and other clients send leftovers), but
every field we do read is checked, so a bad value is a 400 that names the parameter
rather than a failure deep inside an engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ChatRequest", "CompletionRequest", "StreamOptions", "TokenizeRequest", "chat_options"]

MAX_N = 128


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict[str, Any]] | None) -> str | None:
        """Content parts are joined: this server takes text only."""
        if v is None or isinstance(v, str):
            return v
        texts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)

    def to_dict(self) -> dict[str, Any]:
        """The message as the chat template reads it (developer counts as system)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.content or ""}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class _Sampling(_Body):
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    strategy: str | None = None  # our extension: an inference-time strategy spec, e.g. "sc@8"
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1")
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind not in ("text", "json_object", "json_schema"):
                raise ValueError("response_format.type must be text, json_object or json_schema")
            if kind == "json_schema" and not isinstance((rf.get("json_schema") or {}).get("schema"), dict):
                raise ValueError("response_format.json_schema.schema must be an object")
        if isinstance(self.tool_choice, dict):
            name = (self.tool_choice.get("function") or {}).get("name")
            if not name:
                raise ValueError("tool_choice must name a function: {type: function, function: {name}}")
            if not self.tools or name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {name!r}, which is not in tools")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=0)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: a string, a token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


def chat_options(req: ChatRequest) -> dict[str, Any]:
    """The ChatModel keyword arguments a chat request asks for (unset ones left out)."""
    opts: dict[str, Any] = {"n": req.n}
    for key in ("temperature", "top_p", "seed", "stop"):
        if getattr(req, key) is not None:
            opts[key] = getattr(req, key)
    if req.limit is not None:
        opts["max_tokens"] = req.limit
    if req.tools:
        opts["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    if req.response_format is not None and req.response_format.get("type") != "text":
        opts["response_format"] = req.response_format
    if req.logprobs:
        opts["logprobs"] = True
    return opts
