"""Continuous batching over :class:`LlamaRunner`: requests join a decoding batch mid-flight.

One background thread owns the model. Each loop it admits waiting requests into free
slots (one prefill per prompt, copied into ``n`` slots for ``n`` samples), then decodes one
token for every active sequence at once. A finished sequence frees its slot at once (the
last active slot moves into the hole, keeping the batch contiguous), so a request that
arrives while others decode starts on the next step instead of waiting for the batch.

A request may carry a grammar (``SamplingParams.grammar``): each of its sequences gets its
own constraint, which masks the logits before every sample, so the output is enforced
rather than hoped for. Reported logprobs stay those of the raw model distribution (vLLM's
default ``raw_logprobs``): a forced token shows how unlikely the model found it.

One request never fails the others: parameters are checked at ``submit`` (a bad one raises
to its caller), each request's setup (seeded generators, any integer seed taken modulo
2**63; grammar states) runs before it joins a prefill and fails only its own future, and
sampling failures fail only their rows' requests. Stop strings are searched for only where
one could have appeared since the last token, so a step costs the longest stop's length,
not the whole text times the stop strings.
"""

from __future__ import annotations

import concurrent.futures
import math
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from assist.engine._runner import LlamaRunner
from assist.errors import BadRequest, ContextLengthExceeded, Overloaded
from assist.sampling import filter_logits

__all__ = [
    "Constraint",
    "ConstraintFactory",
    "EngineOverloaded",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "SeqOutput",
    "TokenIdLogprob",
]


# Below this temperature sampling is greedy: dividing logits by ~0 overflows (vLLM's rule too).
SAMPLING_EPS = 1e-5


# Seeds are taken modulo 2**63 (what a torch generator holds), so any integer a client sends
# seeds its request instead of failing the batch it joined; seeds below it are unchanged.
SEED_MODULUS = 1 << 63


# Padded tokens one batched prefill may hold: big enough to prefill a burst of requests
# in one forward, small enough that one long prompt does not pad many short ones.
PREFILL_TOKENS = 4096


class EngineOverloaded(Overloaded):
    """The waiting queue is full; retry later (HTTP 429 through :class:`assist.errors.Overloaded`)."""


class Constraint(Protocol):
    """One sequence's grammar state: masks logits in place, then follows the chosen token."""

    def mask_(self, logits: torch.Tensor) -> None: ...
    def accept(self, token: int) -> bool: ...
    def is_terminated(self) -> bool: ...


class ConstraintFactory(Protocol):
    """A compiled grammar; ``new()`` starts a fresh constraint for one sequence."""

    def new(self) -> Constraint: ...


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
    grammar: ConstraintFactory | None = None
    prompt_logprobs: int | None = None  # None: not asked; k: each prompt token's logprob and top k
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks; vLLM's field of the same name)
    # vLLM's further sampling fields, with its semantics (vllm/v1/sample/sampler.py), applied
    # in its order: allowed_token_ids, min_tokens, logit_bias, then the repetition, frequency
    # and presence penalties (all before the greedy pick); min_p after the temperature.
    presence_penalty: float = 0.0  # minus this for every token already generated
    frequency_penalty: float = 0.0  # minus this times each token's count in the output
    repetition_penalty: float = 1.0  # tokens of the prompt or output: logit / p if > 0, else x p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added
    min_p: float = 0.0  # sampling only: drop tokens below min_p x the likeliest's probability
    min_tokens: int = 0  # no stop token (eos, stop_token_ids) or stop string before this many
    include_stop_str_in_output: bool = False  # keep the stop string (or stop token's text)
    allowed_token_ids: tuple[int, ...] | None = None  # sample only among these

    @property
    def adjusts(self) -> bool:
        """Whether the logits are changed before the pick (penalties, biases, masks)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.allowed_token_ids is not None)


@dataclass
class TokenIdLogprob:
    """A sampled (or prompt) token's logprob by token id, with the top alternatives as
    ``(id, logprob)``: the engine's raw reading, which the API layer turns into
    :class:`assist.types.TokenLogprob` (text, bytes)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SeqOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenIdLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenIdLogprob | None] | None = None  # the request's, shared by its outputs


@dataclass
class RequestOutput:
    prompt_tokens: int
    outputs: list[SeqOutput]
    queued_s: float = 0.0
    total_s: float = 0.0
    # One entry per prompt token; the first is None (nothing precedes it to predict it).
    prompt_logprobs: list[TokenIdLogprob | None] | None = None


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
    constraints: list[Constraint | None] = field(default_factory=list)
    stop_window: int = 0  # the longest stop string's length
    pending: int = 0
    prompt_logprobs: list[TokenIdLogprob | None] | None = None
    # Prepared once per request for SamplingParams.adjusts (vocabulary-sized tensors).
    allowed: torch.Tensor | None = None  # bool: the allowed tokens
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    in_prompt: torch.Tensor | None = None  # bool: tokens of the prompt (repetition penalty)
    min_stops: torch.Tensor | None = None  # ids masked until min_tokens


@dataclass
class _Seq:
    request: _Request
    out: SeqOutput
    length: int  # tokens in the cache
    next_token: int  # sampled, not yet fed
    constraint: Constraint | None = None
    checked: int = 0  # no stop string ends within text[:checked] (the text's settled part)


def _resolve(request: _Request) -> None:
    """Hand the result over, unless the caller cancelled meanwhile (a race with its thread)."""
    now = time.perf_counter()
    result = RequestOutput(len(request.prompt), request.outputs, request.started - request.arrived,
                           now - request.arrived, request.prompt_logprobs)
    try:
        request.future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _fail(future: concurrent.futures.Future[RequestOutput], exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        pass


def _gumbel(size: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    u = torch.rand(size, generator=g, device=device).clamp_(min=1e-20)
    return -torch.log(-torch.log(u))


def _gumbel_pick(logits: torch.Tensor, g: torch.Generator | None) -> int:
    """A sample of softmax(logits) by the Gumbel-max trick (what _sample_rows does in batch)."""
    return int((logits + _gumbel(logits.shape[-1], g, logits.device)).argmax())


def _alone(p: SamplingParams) -> bool:
    """Requests that prefill on their own: prompt scoring needs every position's logits."""
    return p.prompt_logprobs is not None or p.max_tokens == 0


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = torch.topk(logp, k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def _validate(p: SamplingParams, vocab_size: int) -> None:
    """Refuse parameters no request may carry (each named), before the request is queued."""
    def whole(name: str, value: object, low: int, high: int | None = None) -> None:
        if type(value) is not int or value < low or (high is not None and value > high):
            bound = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise BadRequest(f"{name} must be an integer {bound}, not {value!r}", param=name)

    def real(name: str, value: object, ok: Callable[[float], bool], what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or not ok(value):
            raise BadRequest(f"{name} must be {what}, not {value!r}", param=name)

    whole("n", p.n, 1)
    whole("max_tokens", p.max_tokens, 0)
    whole("top_k", p.top_k, 0)
    whole("top_logprobs", p.top_logprobs, 0, vocab_size)
    if p.prompt_logprobs is not None:
        whole("prompt_logprobs", p.prompt_logprobs, 0, vocab_size)
    real("temperature", p.temperature, lambda v: v >= 0, "a finite number >= 0")
    real("top_p", p.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
    if p.seed is not None and (isinstance(p.seed, bool) or not isinstance(p.seed, int)):
        raise BadRequest(f"seed must be an integer, not {p.seed!r}", param="seed")
    if not isinstance(p.stop, tuple | list) or not all(isinstance(x, str) and x for x in p.stop):
        raise BadRequest("stop must be non-empty strings", param="stop")
    if not all(type(i) is int for i in p.stop_token_ids):
        raise BadRequest("stop_token_ids must be integers", param="stop_token_ids")
    real("presence_penalty", p.presence_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
    real("frequency_penalty", p.frequency_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
    real("repetition_penalty", p.repetition_penalty, lambda v: v > 0, "a finite number > 0")
    real("min_p", p.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
    whole("min_tokens", p.min_tokens, 0, p.max_tokens if p.max_tokens > 0 else None)
    for i, b in p.logit_bias:
        whole("logit_bias", i, 0, vocab_size - 1)
        real("logit_bias", b, lambda v: True, "a finite number")
    if p.allowed_token_ids is not None:
        if not p.allowed_token_ids:
            raise BadRequest("allowed_token_ids must not be empty", param="allowed_token_ids")
        for i in p.allowed_token_ids:
            whole("allowed_token_ids", i, 0, vocab_size - 1)


def _seed(seed: int | None, i: int) -> int:
    """Sample ``i``'s generator seed: any integer, reduced to what a generator holds."""
    if seed is None:
        return torch.seed() % (1 << 62)
    return (operator.index(seed) + i) % SEED_MODULUS


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
        cfg: Any = runner.cfg
        self.vocab_size = int(cfg.vocab_size)  # the embedding's rows: what a prompt id may be
        self.thread = threading.Thread(target=self._loop, name="assist-engine", daemon=True)
        self.thread.start()

    # -- public ---------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_token: Callable[[int, SeqOutput], None] | None = None,
               ) -> concurrent.futures.Future[RequestOutput]:
        """Queue a request. ``on_token`` runs on the engine thread after every sampled token.

        Parameters are checked here, so a bad one fails this call alone; whatever still goes
        wrong while a request is set up or sampled fails that request's future, never the
        batch it joined.
        """
        if not prompt:
            raise BadRequest("the prompt is empty", param="prompt")
        if not all(type(i) is int and 0 <= i < self.vocab_size for i in prompt):
            raise BadRequest(f"prompt token ids must lie in [0, {self.vocab_size})", param="prompt")
        _validate(params, self.vocab_size)
        if params.n > self.runner.slots:
            raise BadRequest(f"n={params.n} exceeds the engine's {self.runner.slots} slots", param="n")
        # Scoring a prompt (max_tokens=0) may fill the whole context; generating needs room.
        limit = self.runner.max_len if params.max_tokens == 0 else self.runner.max_len - 1
        if len(prompt) > limit:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens; the context holds {self.runner.max_len}")
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
                    _fail(s.request.future, exc)
                self.active.clear()

    def _admit(self) -> None:
        while True:
            taken = self._take()
            if not taken:
                return
            taken = [r for r in taken if self._prepare(r)]
            if not taken:
                continue
            try:
                if len(taken) == 1 and _alone(taken[0].params):
                    self._start(taken[0])
                else:
                    self._start_batch(taken)
            except Exception as exc:  # noqa: BLE001 - the prefill failed: these requests alone
                for s in self.active:
                    if any(s.request is r for r in taken):
                        s.out.finish_reason = "error"
                for r in taken:
                    _fail(r.future, exc)
            self._sweep()

    def _take(self) -> list[_Request]:
        """The next requests to start: consecutive waiting ones that fit the free slots and
        one padded prefill of at most ``PREFILL_TOKENS`` (or a lone scoring request)."""
        taken: list[_Request] = []
        reserved = width = 0
        with self.cond:
            while self.waiting:
                request = self.waiting[0]
                if request.future.cancelled():
                    self.waiting.popleft()
                    continue
                p = request.params
                # Scoring only (max_tokens=0) borrows one free slot for its prefill.
                need = p.n if p.max_tokens > 0 else 1
                if len(self.active) + reserved + need > self.runner.slots:
                    break
                wider = max(width, len(request.prompt))
                if taken and (_alone(p) or wider * (len(taken) + 1) > PREFILL_TOKENS):
                    break
                self.waiting.popleft()
                taken.append(request)
                reserved, width = reserved + need, wider
                if _alone(p):
                    break
        return taken

    def _prepare(self, request: _Request) -> bool:
        """Per-request setup before its prefill (generators, grammar states). A failure fails
        this request alone, and it never joins the batch: False."""
        p = request.params
        try:
            for i in range(p.n):
                g = None
                if p.temperature >= SAMPLING_EPS:
                    g = torch.Generator(device=self.runner.device)
                    g.manual_seed(_seed(p.seed, i))
                request.generators.append(g)
                request.constraints.append(p.grammar.new() if p.grammar is not None else None)
            request.stop_window = max(map(len, p.stop), default=0)
            if p.adjusts:
                self._prepare_adjust(request)
        except Exception as exc:  # noqa: BLE001 - one request's parameters fail that request only
            _fail(request.future, exc)
            return False
        return True

    def _prepare_adjust(self, request: _Request) -> None:
        p, device = request.params, self.runner.device
        lm_head: Any = self.runner.model.lm_head
        width = int(lm_head.weight.shape[0])  # the logits' width
        if p.allowed_token_ids is not None:
            request.allowed = torch.zeros(width, dtype=torch.bool, device=device)
            request.allowed[list(p.allowed_token_ids)] = True
        if p.logit_bias:
            request.bias_ids = torch.tensor([i for i, _ in p.logit_bias], device=device)
            request.bias_values = torch.tensor([min(100.0, max(-100.0, float(b))) for _, b in p.logit_bias],
                                               device=device)
        if p.repetition_penalty != 1.0:
            request.in_prompt = torch.zeros(width, dtype=torch.bool, device=device)
            request.in_prompt[request.prompt] = True
        if p.min_tokens:
            # vLLM's all_stop_token_ids: the eos ids (even under ignore_eos) and stop_token_ids
            request.min_stops = torch.tensor(sorted(set(self.eos_ids) | set(p.stop_token_ids)), device=device)

    @staticmethod
    def _adjust(seq: _Seq, row: torch.Tensor) -> torch.Tensor:
        """One sequence's logits after allowed_token_ids, min_tokens (unconstrained rows:
        a grammar's are masked after its own mask, in _accept), logit_bias and the penalties,
        as vLLM's sampler applies them. ``row`` is changed in place (a copy of the raw one)."""
        r, p = seq.request, seq.request.params
        if r.allowed is not None:
            row.masked_fill_(~r.allowed, float("-inf"))
        if r.min_stops is not None and seq.constraint is None and len(seq.out.token_ids) < p.min_tokens:
            row[r.min_stops] = float("-inf")
        if r.bias_ids is not None and r.bias_values is not None:
            row[r.bias_ids] += r.bias_values
        out = seq.out.token_ids
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            counts = torch.bincount(torch.tensor(out, dtype=torch.long, device=row.device),
                                    minlength=row.shape[-1])[: row.shape[-1]].to(row.dtype)
            seen = counts > 0
            if p.repetition_penalty != 1.0:
                assert r.in_prompt is not None
                hit = r.in_prompt | seen
                scale = torch.where(row > 0, 1.0 / p.repetition_penalty, p.repetition_penalty)
                row.mul_(torch.where(hit, scale, torch.ones_like(scale)))
            if p.frequency_penalty:
                row.sub_(p.frequency_penalty * counts)
            if p.presence_penalty:
                row.sub_(p.presence_penalty * seen.to(row.dtype))
        return row

    def _start(self, request: _Request) -> None:
        """Prefill one request (scoring its prompt when asked) and sample its first tokens."""
        request.started = time.perf_counter()
        p = request.params
        base = len(self.active)
        device = self.runner.device
        tokens = torch.tensor([request.prompt], device=device)
        positions = torch.arange(len(request.prompt), device=device)[None]
        if p.prompt_logprobs is not None:
            every = self.runner.forward(tokens, positions, base, all_positions=True)[0]
            request.prompt_logprobs = self._prompt_logprobs(request.prompt, every, p.prompt_logprobs)
            logits = every[-1:]
        else:
            logits = self.runner.forward(tokens, positions, base)
        if p.max_tokens == 0:
            request.outputs = [SeqOutput(i, finish_reason="length", prompt_logprobs=request.prompt_logprobs)
                               for i in range(p.n)]
            _resolve(request)
            return
        self._spawn([request], logits)

    def _start_batch(self, requests: list[_Request]) -> None:
        """One right-padded prefill for several prompts, each in its own slot.

        Padding writes junk keys past a prompt's end; that is harmless because a decode step
        writes position p before any query reads it, and queries never read beyond their own
        position.
        """
        now = time.perf_counter()
        for r in requests:
            r.started = now
        device = self.runner.device
        lengths = [len(r.prompt) for r in requests]
        width = max(lengths)
        tokens = torch.tensor([r.prompt + [r.prompt[-1]] * (width - len(r.prompt)) for r in requests],
                              device=device)
        positions = torch.arange(width, device=device).expand(len(requests), width)
        last = torch.tensor([n - 1 for n in lengths], device=device)
        logits = self.runner.forward(tokens, positions, len(self.active), last=last)
        self._spawn(requests, logits)

    def _spawn(self, requests: list[_Request], logits: torch.Tensor) -> None:
        """Sequences for freshly prefilled requests, whose caches sit in the next slots (one
        per request, in order): sample ``i`` of a request copies its request's slot."""
        base = len(self.active)
        firsts: list[_Seq] = []
        extra: list[tuple[int, _Seq]] = []
        for b, request in enumerate(requests):
            p = request.params
            request.pending = p.n
            for i in range(p.n):
                out = SeqOutput(index=i, prompt_logprobs=request.prompt_logprobs)
                request.outputs.append(out)
                seq = _Seq(request, out, len(request.prompt), -1, request.constraints[i])
                if i == 0:
                    firsts.append(seq)
                else:
                    extra.append((b, seq))
        self.active.extend(firsts)  # slots base + b: where the prefill put each cache
        for b, seq in extra:
            self.runner.copy_slot(base + b, len(self.active), seq.length)
            self.active.append(seq)
        rows = {id(s): b for b, s in enumerate(firsts)} | {id(s): b for b, s in extra}
        for seq in self.active[base:]:
            try:
                raw = logits[rows[id(seq)]]
                row = self._adjust(seq, raw.clone()) if seq.request.params.adjusts else raw
                self._accept(seq, row, seq.request.generators[seq.out.index], raw=raw)
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others
                seq.out.finish_reason = "error"
                _fail(seq.request.future, exc)

    @staticmethod
    def _prompt_logprobs(prompt: list[int], logits: torch.Tensor, k: int) -> list[TokenIdLogprob | None]:
        # Row t predicts token t + 1, so token 0 has no logprob.
        logp = torch.log_softmax(logits[:-1], -1)
        targets = torch.tensor(prompt[1:], device=logp.device)
        chosen = logp.gather(-1, targets[:, None])[:, 0].tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if k > 0:
            values, ids = torch.topk(logp, k, dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        out: list[TokenIdLogprob | None] = [None]
        out += [TokenIdLogprob(t, v, top) for t, v, top in zip(prompt[1:], chosen, tops, strict=True)]
        return out

    def _decode(self) -> None:
        tokens = torch.tensor([[s.next_token] for s in self.active], device=self.runner.device)
        positions = torch.tensor([[s.length] for s in self.active], device=self.runner.device)
        raw = logits = self.runner.forward(tokens, positions, 0)
        self.steps += 1
        adjusted = [i for i, s in enumerate(self.active) if s.request.params.adjusts]
        if adjusted:  # penalties, biases and masks change the pick, never the reported logprobs
            logits = raw.clone()
            for i in adjusted:
                try:
                    self._adjust(self.active[i], logits[i])
                except Exception as exc:  # noqa: BLE001 - this row's request fails, not the batch
                    self.active[i].out.finish_reason = "error"
                    _fail(self.active[i].request.future, exc)
        # Batch-wide work once per step rather than once per sequence: the greedy pick of every
        # row, the sampled pick of unconstrained sampling rows, and the log-softmax when asked.
        picks = logits.argmax(-1).tolist()
        self._sample_rows(logits, picks)
        logp = torch.log_softmax(raw, -1) if any(s.request.params.logprobs for s in self.active) else None
        for i, s in enumerate(list(self.active)):
            s.length += 1
            if s.request.future.done():  # failed or cancelled: freed by the sweep below
                continue
            try:
                self._accept(s, logits[i], s.request.generators[s.out.index], picks[i],
                             None if logp is None else logp[i], raw=raw[i])
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
                s.out.finish_reason = "error"
                _fail(s.request.future, exc)
        self._sweep()

    def _sample_rows(self, logits: torch.Tensor, picks: list[int]) -> None:
        """Overwrite ``picks`` for unconstrained sampling rows: rows sharing (temperature,
        top_k, top_p) are filtered together; each row draws its Gumbel noise from its own
        seeded generator, so a request's samples do not depend on its batch-mates."""
        groups: dict[tuple[float, int, float, float], list[int]] = {}
        for i, s in enumerate(self.active):
            p = s.request.params
            if p.temperature >= SAMPLING_EPS and s.constraint is None:
                groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
        for (temperature, top_k, top_p, min_p), rows in groups.items():
            try:
                filtered = filter_logits(logits[rows] / temperature, top_k, top_p, min_p)
                noise = torch.stack([_gumbel(logits.shape[-1], self.active[i].request.generators[
                    self.active[i].out.index], logits.device) for i in rows])
                tokens = (filtered + noise).argmax(-1).tolist()
            except Exception as exc:  # noqa: BLE001 - these rows' requests fail, not the batch
                for i in rows:
                    self.active[i].out.finish_reason = "error"
                    _fail(self.active[i].request.future, exc)
                continue
            for i, token in zip(rows, tokens, strict=True):
                picks[i] = token

    def _accept(self, seq: _Seq, logits: torch.Tensor, g: torch.Generator | None,
                greedy: int | None = None, logp: torch.Tensor | None = None,
                raw: torch.Tensor | None = None) -> None:
        """Sample the next token from ``logits`` and record it; decide if the sequence ends.

        ``greedy``/``logp``: the row's pick and log-softmax when the caller computed them for
        the whole batch (``greedy`` is ignored for constrained rows, which mask first).
        ``raw``: the model's own row when ``logits`` were adjusted (what logprobs report).
        """
        p = seq.request.params
        masked = logits
        if seq.constraint is not None:
            masked = logits.clone()  # the raw row stays intact for the reported logprobs
            seq.constraint.mask_(masked)
            r = seq.request
            if r.min_stops is not None and len(seq.out.token_ids) < p.min_tokens:
                kept = masked[r.min_stops].clone()
                masked[r.min_stops] = float("-inf")
                if bool(torch.isneginf(masked).all()):  # the grammar allows only stopping: vLLM lets it
                    masked[r.min_stops] = kept
        if greedy is not None and seq.constraint is None:
            token = greedy  # picked for the whole batch by _decode (greedy or sampled)
        elif p.temperature < SAMPLING_EPS:
            token = int(masked.argmax())
        else:
            token = _gumbel_pick(filter_logits((masked / p.temperature)[None], p.top_k, p.top_p, p.min_p)[0], g)
        out = seq.out
        out.token_ids.append(token)
        if p.logprobs:
            row = torch.log_softmax(logits if raw is None else raw, -1) if logp is None else logp
            out.logprobs.append(TokenIdLogprob(token, float(row[token]), _top(row, p.top_logprobs)))
        seq.next_token = token
        stop_ids = (() if p.ignore_eos else self.eos_ids) + p.stop_token_ids
        # A grammar ends the sequence once complete (its stop token accepted), and a token it
        # rejects (impossible unless the mask was bypassed) ends it rather than break the form.
        grammar_done = seq.constraint is not None and (
            not seq.constraint.accept(token) or seq.constraint.is_terminated())
        # Decoding the text costs more than the rest of a step; do it only for stop strings,
        # for a listener (streaming), and once at the end.
        live = bool(p.stop) or seq.request.on_token is not None
        if token in stop_ids:  # masked before min_tokens, unless a grammar allowed nothing else
            out.finish_reason = "stop"
            out.text = self.decode(out.token_ids if p.include_stop_str_in_output else out.token_ids[:-1])
        else:
            if live:
                out.text = self.decode(out.token_ids)
                if p.stop:
                    if len(out.token_ids) > p.min_tokens:
                        self._find_stop(seq)
                    else:  # vLLM looks for stop strings only in what follows min_tokens tokens
                        seq.checked = len(out.text.rstrip("\ufffd"))
            if out.finish_reason is None:
                if grammar_done:
                    out.finish_reason = "stop"
                elif len(out.token_ids) >= p.max_tokens or seq.length + 1 >= self.runner.max_len:
                    out.finish_reason = "length"
                if out.finish_reason is not None and not live:
                    out.text = self.decode(out.token_ids)
        if seq.request.on_token is not None:
            try:
                seq.request.on_token(token, out)
            except Exception as exc:  # noqa: BLE001 - a broken listener fails its request only
                _fail(seq.request.future, exc)

    @staticmethod
    def _find_stop(seq: _Seq) -> None:
        """Cut ``seq``'s text at the first stop string, looking only where one could have
        appeared since the last token: from the longest stop's length before the settled
        text's end. A step costs the new text plus that window, not the whole text times the
        stop strings."""
        out, stops = seq.out, seq.request.params.stop
        text = out.text
        window = seq.request.stop_window or max(map(len, stops))
        start = max(0, seq.checked - window + 1)
        # The stop string that ends first (vLLM's rule; ties: the first listed).
        found = [(i + len(s), i) for s in stops if (i := text.find(s, start)) >= 0]
        if found:
            end, hit = min(found, key=lambda f: f[0])
            out.text = text[:end] if seq.request.params.include_stop_str_in_output else text[:hit]
            out.finish_reason = "stop"
            return
        # An incomplete UTF-8 character decodes as U+FFFD and changes with the next token.
        settled = len(text)
        while settled > 0 and text[settled - 1] == "\ufffd":
            settled -= 1
        seq.checked = settled

    def _sweep(self) -> None:
        """Release finished or cancelled sequences; compact the batch; resolve requests."""
        i = 0
        while i < len(self.active):
            s = self.active[i]
            if s.out.finish_reason is None and not s.request.future.done():
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:
                self.runner.copy_slot(last, i, self.active[last].length)  # compact the batch
                self.active[i] = self.active[last]
            self.active.pop()
            r = s.request
            r.pending -= 1
            if r.pending == 0:
                _resolve(r)
