"""The built-in torch engine as a ChatModel: ``assist.load(path)``.

Loads any Llama-architecture Hugging Face folder (ours or another), renders chats with the
checkpoint's own chat template, and serves requests through the continuous-batching
scheduler. Tool calls in the output (Hermes ``<tool_call>`` blocks) come back as OpenAI
``tool_calls``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from assist._chat_format import parse_tool_calls
from assist._protocol import Messages
from assist.engine._runner import LlamaRunner
from assist.engine._scheduler import RequestOutput, SamplingParams, Scheduler
from assist.types import (
    ChatCompletion,
    Choice,
    ChoiceLogprobs,
    FunctionCall,
    Message,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

__all__ = ["TorchEngine"]


class TorchEngine:
    """In-process generation with a KV cache and continuous batching."""

    supports_n = True

    def __init__(
        self, path: str | Path, *, device: str | None = None, max_batch: int = 64,
        max_len: int | None = None, name: str | None = None, threads: int | None = None,
    ) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face checkpoint (config.json) in {path}")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.name = name or path.name
        eos = self.model.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [self.tokenizer.eos_token_id])
        self.runner = LlamaRunner(self.model, slots=max_batch,
                                  max_len=max_len or self.model.config.max_position_embeddings)
        # Keep tool-call markers in the text (they are special tokens); drop turn markers.
        drop = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|pad|>")}
        drop |= set(eos_ids)
        drop.discard(self.tokenizer.unk_token_id)

        def decode(ids: Sequence[int]) -> str:
            return self.tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)

        self.scheduler = Scheduler(self.runner, decode, eos_ids)
        self.context_length = self.runner.max_len

    # -- prompts ------------------------------------------------------------------------------
    def encode(self, messages: Messages, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tools=list(tools) if tools else None,
                                                  tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- ChatModel ------------------------------------------------------------------------------
    async def chat(
        self, messages: Messages, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
        max_tokens: int | None = None, stop: str | Sequence[str] | None = None, seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None, response_format: Mapping[str, Any] | None = None,
        logprobs: bool = False, top_logprobs: int = 0, top_k: int = 0,
    ) -> ChatCompletion:
        prompt = self.encode(messages, tools)
        params = self.params(len(prompt), n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                             stop=stop, seed=seed, logprobs=logprobs, top_logprobs=top_logprobs, top_k=top_k)
        result = await asyncio.wrap_future(self.scheduler.submit(prompt, params))
        return self.completion(result, tools=bool(tools))

    def params(self, prompt_len: int, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
               max_tokens: int | None = None, stop: str | Sequence[str] | None = None, seed: int | None = None,
               logprobs: bool = False, top_logprobs: int = 0, top_k: int = 0) -> SamplingParams:
        room = self.context_length - prompt_len
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return SamplingParams(max_tokens=min(max_tokens or room, room), temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=seed, n=n, stop=stops, logprobs=logprobs or top_logprobs > 0,
                              top_logprobs=top_logprobs)

    def completion(self, result: RequestOutput, *, tools: bool) -> ChatCompletion:
        choices = []
        completion_tokens = 0
        for out in result.outputs:
            completion_tokens += len(out.token_ids)
            content, calls = parse_tool_calls(out.text) if tools else (out.text, [])
            message = Message(role="assistant", content=content or (None if calls else ""))
            finish = out.finish_reason or "length"
            if calls:
                message.tool_calls = [ToolCall(function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                                      for c in calls]
                finish = "tool_calls"
            lp = None
            if out.logprobs:
                tok = self.tokenizer
                lp = ChoiceLogprobs(content=[
                    TokenLogprob(token=tok.decode([t.token_id]), logprob=t.logprob,
                                 bytes=list(tok.decode([t.token_id]).encode()),
                                 top_logprobs=[TopLogprob(token=tok.decode([i]), logprob=v,
                                                          bytes=list(tok.decode([i]).encode())) for i, v in t.top])
                    for t in out.logprobs])
            choices.append(Choice(index=out.index, message=message, finish_reason=finish, logprobs=lp))
        usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=result.prompt_tokens + completion_tokens)
        return ChatCompletion(model=self.name, choices=choices, usage=usage, created=int(time.time()))

    def close(self) -> None:
        self.scheduler.close()

    def __enter__(self) -> TorchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


