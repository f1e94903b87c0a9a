"""Continuous batching over :class:`LlamaRunner`: requests join a decoding batch mid-flight.

One background thread owns the model. Each loop it admits waiting requests into free
slots (one prefill per prompt, copied into ``n`` slots for ``n`` samples), then decodes one
token for every active sequence at once. A finished sequence frees its slot at once (the
last active slot moves into the hole, keeping the batch contiguous), so a request that
arrives while others decode starts on the next step instead of waiting for the batch.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from assist._sampling import filter_logits
from assist.engine._runner import LlamaRunner

__all__ = ["EngineOverloaded", "SamplingParams", "Scheduler", "SeqOutput", "RequestOutput", "TokenLogprob"]


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SeqOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class RequestOutput:
    prompt_tokens: int
    outputs: list[SeqOutput]
    queued_s: float = 0.0
    total_s: float = 0.0


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    future: concurrent.futures.Future[RequestOutput]
    on_token: Callable[[int, SeqOutput], None] | None
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    outputs: list[SeqOutput] = field(default_factory=list)
    generators: list[torch.Generator | None] = field(default_factory=list)
    pending: int = 0


@dataclass
class _Seq:
    request: _Request
    out: SeqOutput
    length: int  # tokens in the cache
    next_token: int  # sampled, not yet fed


class Scheduler:
    def __init__(
        self, runner: LlamaRunner, decode: Callable[[Sequence[int]], str], eos_ids: Sequence[int],
        max_waiting: int = 1024,
    ) -> None:
        self.runner = runner
        self.decode = decode
        self.eos_ids = tuple(eos_ids)
        self.max_waiting = max_waiting
        self.waiting: deque[_Request] = deque()
        self.active: list[_Seq] = []
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="assist-engine", daemon=True)
        self.thread.start()

    # -- public ---------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_token: Callable[[int, SeqOutput], None] | None = None) -> concurrent.futures.Future[RequestOutput]:
        if not prompt:
            raise ValueError("the prompt is empty")
        if params.n > self.runner.slots:
            raise ValueError(f"n={params.n} exceeds the engine's {self.runner.slots} slots")
        if len(prompt) >= self.runner.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.runner.max_len}")
        future: concurrent.futures.Future[RequestOutput] = concurrent.futures.Future()
        with self.cond:
            if self.closed:
                raise RuntimeError("the engine is shut down")
            if len(self.waiting) >= self.max_waiting:
                raise EngineOverloaded(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(_Request(list(prompt), params, future, on_token))
            self.cond.notify()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.waiting and not self.active:
                    self.cond.wait()
                if self.closed:
                    for r in self.waiting:
                        r.future.cancel()
                    for s in self.active:
                        s.request.future.cancel()
                    return
            try:
                self._admit()
                if self.active:
                    self._decode()
            except Exception as exc:  # noqa: BLE001 - hand any failure to every caller in flight
                for s in self.active:
                    if not s.request.future.done():
                        s.request.future.set_exception(exc)
                self.active.clear()

    def _admit(self) -> None:
        while True:
            with self.cond:
                if not self.waiting:
                    return
                request = self.waiting[0]
                if request.future.cancelled():
                    self.waiting.popleft()
                    continue
                if len(self.active) + request.params.n > self.runner.slots:
                    return
                self.waiting.popleft()
            request.started = time.perf_counter()
            p = request.params
            base = len(self.active)
            positions = torch.arange(len(request.prompt), device=self.runner.device)[None]
            logits = self.runner.forward(torch.tensor([request.prompt], device=self.runner.device), positions, base)
            request.pending = p.n
            for i in range(p.n):
                slot = base + i
                if i:
                    self.runner.copy_slot(base, slot, len(request.prompt))
                g = None
                if p.temperature > 0:
                    g = torch.Generator(device=self.runner.device)
                    g.manual_seed(p.seed + i if p.seed is not None else torch.seed() % (1 << 62))
                request.generators.append(g)
                out = SeqOutput(index=i)
                request.outputs.append(out)
                seq = _Seq(request, out, len(request.prompt), -1)
                self.active.append(seq)
                self._accept(seq, logits[0], g)
            self._sweep()

    def _decode(self) -> None:
        tokens = torch.tensor([[s.next_token] for s in self.active], device=self.runner.device)
        positions = torch.tensor([[s.length] for s in self.active], device=self.runner.device)
        logits = self.runner.forward(tokens, positions, 0)
        self.steps += 1
        for s, row in zip(list(self.active), logits, strict=True):
            s.length += 1
            self._accept(s, row, s.request.generators[s.out.index])
        self._sweep()

    def _accept(self, seq: _Seq, logits: torch.Tensor, g: torch.Generator | None) -> None:
        """Sample the next token from ``logits`` and record it; decide if the sequence ends."""
        p = seq.request.params
        if p.temperature <= 0:
            token = int(logits.argmax())
        else:
            filtered = filter_logits((logits / p.temperature)[None], p.top_k, p.top_p)[0]
            token = int(torch.multinomial(torch.softmax(filtered, -1), 1, generator=g))
        out = seq.out
        out.token_ids.append(token)
        if p.logprobs:
            logp = torch.log_softmax(logits, -1)
            top = []
            if p.top_logprobs:
                values, ids = torch.topk(logp, p.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            out.logprobs.append(TokenLogprob(token, float(logp[token]), top))
        seq.next_token = token
        stop_ids = self.eos_ids + p.stop_token_ids
        if token in stop_ids:
            out.finish_reason = "stop"
            out.text = self.decode(out.token_ids[:-1])
        else:
            out.text = self.decode(out.token_ids)
            hit = min((i for i in (out.text.find(s) for s in p.stop) if i >= 0), default=-1)
            if hit >= 0:
                out.text = out.text[:hit]
                out.finish_reason = "stop"
            elif len(out.token_ids) >= p.max_tokens or seq.length + 1 >= self.runner.max_len:
                out.finish_reason = "length"
        if seq.request.on_token is not None:
            seq.request.on_token(token, out)

    def _sweep(self) -> None:
        """Release finished or cancelled sequences; compact the batch; resolve requests."""
        i = 0
        while i < len(self.active):
            s = self.active[i]
            if s.out.finish_reason is None and not s.request.future.cancelled():
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:
                self.runner.copy_slot(last, i, self.active[last].length)  # compact the batch
                self.active[i] = self.active[last]
            self.active.pop()
            r = s.request
            r.pending -= 1
            if r.pending == 0 and not r.future.done():
                now = time.perf_counter()
                r.future.set_result(RequestOutput(len(r.prompt), r.outputs, r.started - r.arrived, now - r.arrived))
