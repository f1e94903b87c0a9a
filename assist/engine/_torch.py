"""The built-in torch engine as a ChatModel: ``assist.load(path)``.

Loads any Llama-architecture Hugging Face folder (ours or another), renders chats with the
checkpoint's own chat template, and serves requests through the continuous-batching
scheduler. Tool calls in the output (Hermes ``<tool_call>`` blocks) come back as OpenAI
``tool_calls``. Besides ``chat`` it offers what an OpenAI-compatible server needs:
``stream_chat``, legacy ``complete``/``stream_complete`` (with prompt logprobs for
loglikelihood scoring), ``tokenize``/``detokenize``; ``response_format`` and a forcing
``tool_choice`` are enforced by a grammar (:mod:`assist.engine._grammar`).

Arguments are checked here, before anything is queued, so a bad request is a
:class:`assist.errors.BadRequest` naming its parameter and a full queue is
:class:`assist.errors.Overloaded`. Cancelling a call (or closing a stream) cancels its
generation, which frees its batch slots on the next step.

Chat prompts are encoded by :class:`assist.chat_format.ChatEncoder`: only the template's own
special tokens are control tokens; message contents, tool results and tool definitions are
tokenized with special tokens split, so text can never fake a turn or a tool call. ``chat``
and ``complete`` prepare a request (template, tokenizing, grammar compiling) in a worker
thread, so a long prompt or schema never blocks the caller's event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from assist.chat_format import ChatEncoder, content_text
from assist.engine import _stream
from assist.engine._grammar import Grammar, GrammarCache, parse_calls, plan_tools
from assist.engine._prefix_cache import PrefixCache
from assist.engine._runner import LlamaRunner
from assist.engine._scheduler import RequestOutput, SamplingParams, Scheduler, TokenIdLogprob
from assist.errors import BadRequest, ContextLengthExceeded
from assist.protocol import Messages
from assist.types import (
    ChatCompletion,
    Choice,
    ChoiceLogprobs,
    FunctionCall,
    Message,
    PromptTokensDetails,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

__all__ = ["TorchEngine"]

# The prefix cache's default budget: on, since greedy answers are the same with it and a
# request that shares no prefix pays only hashing and a copy of its blocks (bench/prefix_cache.py).
# 64 MiB hold 16k tokens of the demo model's keys and values (an 8B model's with 8 KV heads:
# 512 tokens in bf16; give such a model more).
PREFIX_CACHE_MB = 64.0
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs (vLLM's default for legacy logprobs)

# vLLM's further sampling fields that this engine implements, with vLLM's semantics (see
# SamplingParams); ``chat``/``complete`` take them as keyword arguments (None: the default).
VLLM_SAMPLING = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_p",
                 "min_tokens", "stop_token_ids", "include_stop_str_in_output", "allowed_token_ids",
                 "skip_special_tokens")


def sampling_extras(extra: Mapping[str, Any]) -> dict[str, Any]:
    """SamplingParams fields from vLLM-style keyword arguments; a name this engine does not
    implement is a 400 naming it (never silently ignored). Values are checked at submit."""
    out: dict[str, Any] = {}
    for key, value in extra.items():
        if key not in VLLM_SAMPLING:
            raise BadRequest(f"{key} is not supported by the torch engine", param=key, code="unsupported_parameter")
        if value is None:
            continue
        if key == "logit_bias":
            if not isinstance(value, Mapping):
                raise BadRequest("logit_bias must map token ids to biases", param=key)
            biases: dict[int, Any] = {}
            for token, bias in value.items():
                try:
                    biases[int(token)] = bias
                except (TypeError, ValueError):
                    raise BadRequest(f"logit_bias keys must be token ids, not {token!r}", param=key) from None
            out[key] = tuple(biases.items())
        elif key in ("stop_token_ids", "allowed_token_ids"):
            if not isinstance(value, Sequence) or isinstance(value, str):
                raise BadRequest(f"{key} must be a list of token ids", param=key)
            out[key] = tuple(dict.fromkeys(value)) if key == "stop_token_ids" else tuple(value)
        else:
            out[key] = value
    return out


def _skip_special(extra: dict[str, Any], *, default: bool) -> bool:
    """vLLM's ``skip_special_tokens`` (taken out of ``extra``); None or absent: ``default``."""
    value = extra.pop("skip_special_tokens", None)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest("skip_special_tokens must be true or false", param="skip_special_tokens")
    return value


class TorchEngine:
    """In-process generation with a KV cache and continuous batching."""

    supports_n = True

    def __init__(
        self, path: str | Path, *, device: str | None = None, max_batch: int = 64,
        max_len: int | None = None, name: str | None = None, threads: int | None = None,
        dtype: str | torch.dtype | None = None, prefix_cache_mb: float = PREFIX_CACHE_MB,
        compile: bool = False,
    ) -> None:
        """``dtype``: of the weights (None: bfloat16 on a GPU, float32 on the CPU); ``max_len``:
        the context cap in tokens, prompt and completion (None: the checkpoint's
        ``max_position_embeddings``; more is refused); ``prefix_cache_mb``: memory for cached
        prompt prefixes (:mod:`assist.engine._prefix_cache`; 0: no prefix caching);
        ``compile``: decode steps through ``torch.compile`` (:mod:`assist.engine._compiled`:
        about twice as fast at small batches on the CPU; the engine takes seconds longer to
        start, and decodes eagerly where compiling fails: see :attr:`compiled`)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face checkpoint (config.json) in {path}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads or self.device.type == "cpu":
            # Intra-op threads, process-wide. On the CPU all cores but one: the scheduler loop
            # and the HTTP server need a core of their own, and an oversubscribed OpenMP pool
            # spins (measured on 2 cores: 1 thread 4.8k tok/s at batch 64, 2 threads 3.8k).
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
        if isinstance(dtype, str):
            if dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
            dtype = getattr(torch, dtype)
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.name = name or path.name
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [self.tokenizer.eos_token_id])
        positions = int(self.model.config.max_position_embeddings)
        if max_len is not None and not 0 < max_len <= positions:
            raise BadRequest(f"max_model_len {max_len}: the checkpoint has {positions} positions; "
                             f"give 1 to {positions}", param="max_model_len")
        self.runner = LlamaRunner(self.model, slots=max_batch, max_len=max_len or positions, compile=compile)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        # Text keeps special tokens only where asked (vLLM's skip_special_tokens=False) or where
        # tool calls are parsed out of it (their markers are special tokens); turn markers and
        # eos are dropped either way.
        drop = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|pad|>")}
        drop |= set(self.eos_ids)
        drop.discard(self.tokenizer.unk_token_id)
        drop_all = drop | set(self.tokenizer.all_special_ids)

        def decode(ids: Sequence[int], skip_special: bool = False) -> str:
            gone = drop_all if skip_special else drop
            return self.tokenizer.decode([i for i in ids if i not in gone], skip_special_tokens=False)

        if not prefix_cache_mb >= 0:
            raise BadRequest(f"prefix_cache_mb {prefix_cache_mb}: must be >= 0", param="prefix_cache_mb")
        cache = PrefixCache(self.runner.block_shape, budget_bytes=int(prefix_cache_mb * (1 << 20)),
                            dtype=self.runner.dtype, device=self.device) if prefix_cache_mb else None
        self.scheduler = Scheduler(self.runner, decode, self.eos_ids, prefix_cache=cache)
        self.context_length = self.runner.max_len
        self._pieces: dict[int, str] = {}
        self._grammars: GrammarCache | None = None
        self._grammars_lock = threading.Lock()
        self.chat_encoder = ChatEncoder(self.tokenizer)

    @property
    def compiled(self) -> bool:
        """Whether decode steps run compiled (asked for, and compiling worked here)."""
        return self.runner.compiled

    @property
    def grammars(self) -> GrammarCache:
        """Built on first use, so a tokenizer xgrammar cannot read only fails constrained requests."""
        with self._grammars_lock:  # requests are prepared on worker threads
            if self._grammars is None:
                self._grammars = GrammarCache(self.tokenizer, self.vocab_size, self.eos_ids)
            return self._grammars

    # -- text <-> tokens --------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of plain text, as a completion prompt is tokenized (``add_special_tokens``:
        the tokenizer's own BOS and the like, as vLLM's field of that name)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def tokenizer_info(self) -> dict[str, Any]:
        """vLLM's ``/tokenizer_info``: the tokenizer's configuration (its init arguments
        without file paths, special tokens as text), its class and its chat template."""
        def plain(value: Any) -> Any:
            if hasattr(value, "content"):  # an AddedToken
                return value.content
            if isinstance(value, Mapping):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            return value if isinstance(value, str | int | float | bool) or value is None else str(value)

        config = {k: v for k, v in dict(getattr(self.tokenizer, "init_kwargs", None) or {}).items()
                  if k not in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")}
        info: dict[str, Any] = plain(config)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if info.get(key) is None and getattr(self.tokenizer, key, None) is not None:
                info[key] = str(getattr(self.tokenizer, key))
        info["tokenizer_class"] = type(self.tokenizer).__name__
        if getattr(self.tokenizer, "chat_template", None):
            info["chat_template"] = self.tokenizer.chat_template
        return info

    def piece(self, token_id: int) -> str:
        """One token's text (what logprobs report it as)."""
        if token_id not in self._pieces:
            self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._pieces[token_id]

    def encode(self, messages: Messages, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """The chat prompt's ids: the checkpoint's template, ending with the assistant's turn."""
        if not messages:
            raise BadRequest("messages must not be empty", param="messages")
        msgs = [{**m, "content": content_text(m.get("content"))} for m in messages]
        try:
            # Only the template writes control tokens; every content is tokenized as text.
            return self.chat_encoder.encode(msgs, list(tools) if tools else None, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template that cannot render these messages
            raise BadRequest(f"cannot render the messages: {exc}", param="messages") from exc

    # -- checks ---------------------------------------------------------------------------------
    def _check(self, *, n: int, temperature: float, top_p: float, max_tokens: int | None, seed: int | None,
               top_logprobs: int, top_k: int, logprobs_param: str = "top_logprobs") -> None:
        if seed is not None and not isinstance(seed, int):
            raise BadRequest(f"seed must be an integer, not {seed!r}", param="seed")
        if not isinstance(n, int) or n < 1:
            raise BadRequest(f"n must be at least 1, not {n!r}", param="n")
        if n > self.runner.slots:
            raise BadRequest(f"n={n} exceeds this engine's {self.runner.slots} batch slots", param="n")
        if temperature is None or temperature < 0:
            raise BadRequest(f"temperature must be >= 0, not {temperature!r}", param="temperature")
        if top_p is None or not 0 < top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], not {top_p!r}", param="top_p")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
            raise BadRequest(f"max_tokens must be >= 0, not {max_tokens!r}", param="max_tokens")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"{logprobs_param} must be in [0, {MAX_TOP_LOGPROBS}], not {top_logprobs}",
                             param=logprobs_param)
        if top_k is None or top_k < 0:
            raise BadRequest(f"top_k must be >= 0, not {top_k!r}", param="top_k")

    def _budget(self, prompt_len: int, max_tokens: int | None, what: str) -> int:
        """``max_tokens``, or the rest of the context when None; refuses what cannot fit."""
        limit = self.context_length
        if max_tokens is None:
            if prompt_len >= limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens. However, your {what} "
                    f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
                    param=what)
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                f"completion). Please reduce the length of the {what} or completion.", param=what)
        return max_tokens

    @staticmethod
    def _stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop must be a string or a list of strings", param="stop")
        return tuple(s for s in stops if s)  # an empty stop string would cut every answer to ""

    def _chat_request(
        self, messages: Messages, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = None, stop: str | Sequence[str] | None = None, seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None,
        response_format: Mapping[str, Any] | None = None, logprobs: bool = False, top_logprobs: int = 0,
        top_k: int = 0, ignore_eos: bool = False, **extra: Any,
    ) -> tuple[list[int], SamplingParams, bool]:
        """(prompt ids, sampling params, whether to parse tool calls) for a chat request."""
        self._check(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                    top_logprobs=top_logprobs or 0, top_k=top_k or 0)
        plan = plan_tools(tools, tool_choice)
        fmt = self.grammars.response_format(response_format) if response_format else None
        forced = self.grammars.tool_calls(plan) if plan.forced else None
        grammar: Grammar | None = forced or fmt  # a forced tool call is the whole answer
        prompt = self.encode(messages, plan.prompt_tools)
        skip = _skip_special(extra, default=not plan.parse)  # vLLM's hermes parser keeps them for tools
        params = SamplingParams(
            max_tokens=self._budget(len(prompt), max_tokens, "messages"), temperature=temperature,
            top_p=top_p, top_k=top_k or 0, seed=seed, n=n, stop=self._stops(stop),
            logprobs=bool(logprobs or top_logprobs), top_logprobs=top_logprobs or 0, grammar=grammar,
            ignore_eos=ignore_eos, skip_special_tokens=skip, **sampling_extras(extra))
        return prompt, params, plan.parse

    def _completion_request(
        self, prompt: str | Sequence[int], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = 16, stop: str | Sequence[str] | None = None, seed: int | None = None,
        echo: bool = False, logprobs: int | None = None, top_k: int = 0, ignore_eos: bool = False,
        add_special_tokens: bool = True, **extra: Any,
    ) -> tuple[list[int], str, SamplingParams]:
        """(prompt ids, prompt text, sampling params) for a legacy completion request."""
        self._check(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                    top_logprobs=logprobs or 0, top_k=top_k or 0, logprobs_param="logprobs")
        if isinstance(prompt, str):
            ids, text = self.tokenize(prompt, add_special_tokens=add_special_tokens), prompt
        else:
            ids = list(prompt)
            if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
                raise BadRequest(f"prompt token ids must lie in [0, {self.vocab_size})", param="prompt")
            text = self.detokenize(ids)
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        want = logprobs is not None
        params = SamplingParams(
            max_tokens=self._budget(len(ids), max_tokens, "prompt"), temperature=temperature, top_p=top_p,
            top_k=top_k or 0, seed=seed, n=n, stop=self._stops(stop), logprobs=want,
            top_logprobs=logprobs or 0, prompt_logprobs=(logprobs or 0) if echo and want else None,
            ignore_eos=ignore_eos, skip_special_tokens=_skip_special(extra, default=True),
            **sampling_extras(extra))
        return ids, text, params

    # -- chat -----------------------------------------------------------------------------------
    async def chat(
        self, messages: Messages, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = None, stop: str | Sequence[str] | None = None, seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None,
        response_format: Mapping[str, Any] | None = None, logprobs: bool = False, top_logprobs: int = 0,
        top_k: int = 0, ignore_eos: bool = False, **extra: Any,
    ) -> ChatCompletion:
        # Prepared in a worker: the template, tokenizing and a grammar compile never block the loop.
        prompt, params, parse = await asyncio.to_thread(
            self._chat_request, messages, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
            stop=stop, seed=seed, tools=tools, tool_choice=tool_choice, response_format=response_format,
            logprobs=logprobs, top_logprobs=top_logprobs, top_k=top_k, ignore_eos=ignore_eos, **extra)
        # Cancelling this await cancels the scheduler's future (wrap_future chains it back).
        result = await asyncio.wrap_future(self.scheduler.submit(prompt, params))
        return self.completion(result, tools=parse)

    def stream_chat(
        self, messages: Messages, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = None, stop: str | Sequence[str] | None = None, seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None,
        response_format: Mapping[str, Any] | None = None, logprobs: bool = False, top_logprobs: int = 0,
        top_k: int = 0, ignore_eos: bool = False, include_usage: bool = False, **extra: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """``chat.completion.chunk`` dicts. Arguments are checked now; the request is queued on
        the first ``__anext__`` (so a full queue raises there, before any chunk)."""
        prompt, params, parse = self._chat_request(
            messages, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, seed=seed,
            tools=tools, tool_choice=tool_choice, response_format=response_format, logprobs=logprobs,
            top_logprobs=top_logprobs, top_k=top_k, ignore_eos=ignore_eos, **extra)
        return _stream.chat_chunks(self, prompt, params, parse=parse, include_usage=include_usage)

    def completion(self, result: RequestOutput, *, tools: bool) -> ChatCompletion:
        choices = []
        completion_tokens = 0
        for out in result.outputs:
            completion_tokens += len(out.token_ids)
            content, calls = parse_calls(out.text) if tools else (out.text, [])
            message = Message(role="assistant", content=content or (None if calls else ""))
            finish = out.finish_reason or "length"
            if calls:
                message.tool_calls = [
                    ToolCall(function=FunctionCall(name=c["name"], arguments=c["arguments"])) for c in calls]
                finish = "tool_calls"
            lp = ChoiceLogprobs(content=self.chat_logprobs(out.logprobs)) if out.logprobs else None
            choices.append(Choice(index=out.index, message=message, finish_reason=finish, logprobs=lp))
        usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=result.prompt_tokens + completion_tokens,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens))
        return ChatCompletion(model=self.name, choices=choices, usage=usage, created=int(time.time()))

    def chat_logprobs(self, entries: Sequence[TokenIdLogprob]) -> list[TokenLogprob]:
        """OpenAI chat logprobs of sampled tokens (from the raw model distribution)."""
        def top(i: int, v: float) -> TopLogprob:
            return TopLogprob(token=self.piece(i), logprob=v, bytes=list(self.piece(i).encode()))

        return [TokenLogprob(**top(t.token_id, t.logprob).model_dump(),
                             top_logprobs=[top(i, v) for i, v in t.top]) for t in entries]

    # -- legacy completions ---------------------------------------------------------------------
    async def complete(
        self, prompt: str | list[int], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = 16, stop: str | Sequence[str] | None = None, seed: int | None = None,
        echo: bool = False, logprobs: int | None = None, top_k: int = 0, ignore_eos: bool = False,
        **extra: Any,
    ) -> dict[str, Any]:
        """An OpenAI ``text_completion`` object. ``echo`` prepends the prompt (with its logprobs
        when ``logprobs`` is set, scored by the same prefill); ``max_tokens=0`` only scores."""
        ids, text, params = await asyncio.to_thread(
            self._completion_request, prompt, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
            stop=stop, seed=seed, echo=echo, logprobs=logprobs, top_k=top_k, ignore_eos=ignore_eos, **extra)
        result = await asyncio.wrap_future(self.scheduler.submit(ids, params))
        choices = []
        for out in result.outputs:
            lp = None
            if logprobs is not None:
                scored = result.prompt_logprobs if echo else None
                lp = _stream.legacy_logprobs(self, scored, ids, out.logprobs, 0)
            choices.append({"index": out.index, "text": (text if echo else "") + out.text, "logprobs": lp,
                            "finish_reason": out.finish_reason or "length"})
        used = sum(len(o.token_ids) for o in result.outputs)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": used,
                          "total_tokens": len(ids) + used,
                          "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}}

    def stream_complete(
        self, prompt: str | list[int], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = 16, stop: str | Sequence[str] | None = None, seed: int | None = None,
        echo: bool = False, logprobs: int | None = None, top_k: int = 0, ignore_eos: bool = False,
        include_usage: bool = False, **extra: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """``text_completion`` chunks (checked now, queued on the first ``__anext__``)."""
        ids, text, params = self._completion_request(
            prompt, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, seed=seed,
            echo=echo, logprobs=logprobs, top_k=top_k, ignore_eos=ignore_eos, **extra)
        return _stream.completion_chunks(self, ids, text if echo else None, params,
                                         include_usage=include_usage)

    def close(self) -> None:
        self.scheduler.close()
        if self._grammars is not None:
            self._grammars.close()

    def __enter__(self) -> TorchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
