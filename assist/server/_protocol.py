"""Request bodies of the OpenAI-compatible endpoint, validated with pydantic.

Unknown fields are accepted and ignored (lm-eval and other clients send leftovers), but
every field we do read is checked, so a bad value is a 400 that names the parameter
rather than a failure deep inside an engine. vLLM's sampling fields are read too (the
torch engine implements them with vLLM's semantics); the vLLM fields it does not implement
are refused by :func:`refuse_unsupported` when they ask for anything but their neutral
value, so one request never means two things depending on the engine behind it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticSerializationError

from assist.errors import BadRequest

__all__ = [
    "MAX_INT",
    "MAX_MESSAGES",
    "MAX_N",
    "MAX_PROMPTS",
    "MAX_SEQUENCES",
    "MAX_STOP_CHARS",
    "ChatRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "StreamOptions",
    "TokenizeRequest",
    "chat_options",
    "check_text",
    "refuse_unsupported",
    "vllm_sampling",
]

MAX_N = 128  # choices per prompt
MAX_PROMPTS = 256  # prompts in one /v1/completions list
MAX_SEQUENCES = 512  # n x prompts: the sequences one /v1/completions request may ask for
MAX_MESSAGES = 4096  # messages in one chat (pydantic stops counting at the limit: no parse of a flood)
MAX_TOOLS = 128  # tools in one chat (OpenAI's limit)
MAX_STOP = 16  # stop sequences per request
MAX_STOP_CHARS = 256  # characters per stop sequence (checked against every decoded token)
MAX_TOKEN_LIST = 4096  # ids in stop_token_ids, allowed_token_ids or logit_bias
MAX_INT = 2**31 - 1  # max_tokens, top_k and the like: beyond any context, and no overflow anywhere
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's range (a signed 64-bit integer)
SEED_MOD = 2**63  # seeds are used as seed % 2**63: non-negative, and seed + i fits 64 bits


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
    top_k: int | None = Field(None, ge=-1, le=MAX_INT)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_INT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    strategy: str | None = None  # our extension: an inference-time strategy spec, e.g. "sc@8"
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    # OpenAI's penalties and vLLM's further sampling fields (vLLM's bounds and meaning)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_TOKEN_LIST)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0, le=MAX_INT)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_LIST)
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = Field(None, min_length=1, max_length=MAX_TOKEN_LIST)
    skip_special_tokens: bool = True  # vLLM's default; tool-calling chats keep them all the same

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            try:
                int(key)
            except ValueError:
                raise ValueError(f"keys must be token ids, not {key!r}") from None
            if bias != bias or bias in (float("inf"), float("-inf")):
                raise ValueError("biases must be finite numbers")
        return v

    @model_validator(mode="after")
    def _min_tokens(self) -> _Sampling:
        limit = getattr(self, "max_completion_tokens", None) or self.max_tokens
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({limit})")
        return self

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        """Any signed 64-bit seed is accepted, as OpenAI does; a negative one is used as
        ``seed % 2**63``, so every engine (and ``seed + i`` for choice i) gets a value it takes."""
        return None if v is None else v % SEED_MOD

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        for s in [v] if isinstance(v, str) else v or []:
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence may have at most {MAX_STOP_CHARS} characters, "
                                 f"not {len(s)}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # Our extension: each choice of a strategy's answer also carries its trace (votes,
    # scores, critiques, tool calls, passages), its extracted answer and its cost. Off by
    # default: a trace holds every sampled text, far more than a client usually wants.
    # Streamed, it rides on each choice's last chunk (the one with its finish_reason).
    return_trace: bool = False

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
    max_tokens: int | None = Field(16, ge=0, le=MAX_INT)
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS and the like on a text prompt

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        prompts = len(v) if isinstance(v, list) and not isinstance(v[0], int) else 1
        if prompts > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, not {prompts}")
        n = info.data.get("n", 1)  # validated before prompt
        if prompts * n > MAX_SEQUENCES:
            raise ValueError(f"n x prompts may be at most {MAX_SEQUENCES}, not {n} x {prompts}")
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
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # vLLM's: default true for a prompt, false for messages
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)

    @field_validator("tokens")
    @classmethod
    def _ids(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("token ids must be >= 0")
        return v


# vLLM's implemented sampling fields and their neutral values (left out of the engine call).
VLLM_SAMPLING: dict[str, Any] = {
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": {},
    "min_p": 0.0, "min_tokens": 0, "stop_token_ids": [], "include_stop_str_in_output": False,
    "allowed_token_ids": None, "skip_special_tokens": True,
}

# vLLM (and OpenAI) request fields the torch engine does not implement, with the values that
# ask for nothing (None always does). Any other value is a 400 naming the field. Fields that
# change no result (user, priority, request_id, cache_salt, stream_interval, length_penalty
# without beam search, ...) are accepted as they are everywhere.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,), "best_of": (1,), "watermarking": (False,), "bad_words": ([],),
    "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (), "prompt_logprobs": (), "logprob_token_ids": ([],), "suffix": ("",),
    "structured_outputs": (), "guided_json": (), "guided_regex": (), "guided_choice": (),
    "guided_grammar": (), "guided_decoding_backend": (), "vllm_xargs": ({},), "repetition_detection": (),
    "thinking_token_budget": (), "return_tokens_as_token_ids": (False,), "return_token_ids": (False,),
    "return_token_offsets": (False,), "return_prompt_text": (False,), "prompt_embeds": (),
    "mm_payload": (), "media_io_kwargs": ({},), "mm_processor_kwargs": ({},), "documents": ([],),
    "chat_template": (), "chat_template_kwargs": ({},), "continue_final_message": (False,),
    "reasoning_effort": (), "functions": (), "function_call": (), "audio": (), "modalities": (["text"],),
    "prediction": (), "web_search_options": (),
}
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "add_generation_prompt": (True,), "add_special_tokens": (False,),
    "parallel_tool_calls": (True,),
}


def refuse_unsupported(req: BaseModel) -> None:
    """A 400 naming the first field of ``req`` that the torch engine would otherwise ignore:
    a vLLM or OpenAI field it does not implement, set to anything but its neutral value."""
    extra = dict(req.model_extra or {})
    table = {**UNSUPPORTED, **(CHAT_UNSUPPORTED if isinstance(req, ChatRequest) else {})}
    for name, neutral in table.items():
        if name in extra and extra[name] is not None and extra[name] not in neutral:
            raise BadRequest(f"{name} is not supported by the torch engine (vLLM's engine takes it: serve with "
                             f"--engine vllm)", param=name, code="unsupported_parameter")


def vllm_sampling(req: _Sampling) -> dict[str, Any]:
    """The vLLM sampling fields ``req`` sets to something other than their neutral value, as
    the torch engine's keyword arguments."""
    out: dict[str, Any] = {}
    for name, neutral in VLLM_SAMPLING.items():
        value = getattr(req, name)
        if value is not None and value != neutral:
            out[name] = value
    return out


def _is_text(value: Any) -> bool:
    """Whether every string in ``value`` (keys included) is valid Unicode (C speed)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    except (RecursionError, ValueError, TypeError):
        return True  # not something to judge here: nested past what any encoder takes
    return True


def _printable(key: Any) -> str:
    return str(key).encode("utf-8", "backslashreplace").decode()


def _locate(value: Any) -> str | None:
    """The dotted path of a string in ``value`` that is not valid Unicode (None: there is
    none), found by halving each level's entries, so a wide body costs O(size x log(width))
    in C. Each step keeps the invariant that ``value`` holds such a string."""
    if _is_text(value):
        return None
    path: list[str] = []
    while isinstance(value, dict | list):
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        values = list(value.values()) if isinstance(value, dict) else value
        if isinstance(value, dict) and not _is_text(keys):
            values = keys  # the key itself is the bad string
        lo, hi = 0, len(values)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _is_text(values[lo:mid]):
                lo = mid
            else:
                hi = mid
        path.append(_printable(keys[lo]))
        value = values[lo]
    return ".".join(path)


def check_text(body: BaseModel) -> None:
    """Refuse a string the body carries that is not valid Unicode text (a lone surrogate such
    as ``"\\ud800"``, which JSON can spell): no tokenizer, upstream or JSON encoder takes it.
    The error names the field, e.g. ``messages.0.content``. Unknown fields are checked as
    well (an upstream backend forwards them). A valid body costs one serialization in Rust."""
    try:
        body.model_dump_json()
        return
    except PydanticSerializationError:  # a bad string, or nesting past the serializer's limit
        pass
    path = _locate(body.model_dump())
    if path is None:
        return
    raise BadRequest(f"{path or 'body'}: not valid Unicode text (it holds a lone surrogate)",
                     param=path or None, code="invalid_text")


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
