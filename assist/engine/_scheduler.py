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

With a prefix cache (:mod:`assist.engine._prefix_cache`), a request's longest cached
block-aligned prefix is copied into its slot and only the rest is prefilled (rows of one
batched prefill start at their own positions); the prompt's full blocks are cached after
its prefill, and a finished sequence's (prompt and answer) when it ends, so the next call
of a conversation prefills only what is new.

One request never fails the others: parameters are checked at ``submit`` (a bad one raises
to its caller), each request's setup (seeded generators, any integer seed taken modulo
2**63; grammar states) runs before it joins a prefill and fails only its own future, and
sampling failures fail only their rows' requests. Stop strings are searched for only where
one could have appeared since the last token, so a step costs the longest stop's length,
not the whole text times the stop strings.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from assist._signals import start_quiet
from assist.engine._params import (
    SAMPLING_EPS,
    Constraint,
    ConstraintFactory,
    EngineOverloaded,
    RequestOutput,
    SamplingParams,
    SeqOutput,
    TokenIdLogprob,
    validate,
)
from assist.engine._prefix_cache import PrefixCache
from assist.engine._runner import LlamaRunner
from assist.engine._sampling import (
    Adjustments,
    generator_seed,
    top_logprobs,
)
from assist.errors import BadRequest, ContextLengthExceeded
from assist.sampling import draw, filter_logits

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


# Padded tokens one batched prefill may hold: big enough to prefill a burst of requests
# in one forward, small enough that one long prompt does not pad many short ones.
PREFILL_TOKENS = 4096


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
    adjust: Adjustments | None = None  # prepared once, for SamplingParams.adjusts
    cached: int = 0  # prompt tokens copied from the prefix cache
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the prompt's full blocks


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
                           now - request.arrived, request.prompt_logprobs, request.cached)
    try:
        request.future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _fail(future: concurrent.futures.Future[RequestOutput], exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        pass


def _alone(p: SamplingParams) -> bool:
    """Requests that prefill on their own: prompt scoring needs every position's logits."""
    return p.prompt_logprobs is not None or p.max_tokens == 0


class Scheduler:
    def __init__(
        self, runner: LlamaRunner, decode: Callable[..., str], eos_ids: Sequence[int],
        max_waiting: int = 1024, prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.runner = runner
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.capacity else None
        # Prompt tokens, in tokens: submitted, actually computed by a prefill, and the prefix
        # cache's queries and hits (vLLM's prefix_cache_queries / prefix_cache_hits).
        self.prompt_tokens = self.prefilled_tokens = self.prefix_queries = self.prefix_hits = 0
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
        start_quiet(self.thread)  # Ctrl-C is the main thread's (assist/_signals.py)

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
        validate(params, self.vocab_size)
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
                    g.manual_seed(generator_seed(p.seed, i))
                request.generators.append(g)
                request.constraints.append(p.grammar.new() if p.grammar is not None else None)
            request.stop_window = max(map(len, p.stop), default=0)
            if p.adjusts:
                lm_head: Any = self.runner.model.lm_head
                request.adjust = Adjustments.build(p, request.prompt, int(lm_head.weight.shape[0]),
                                                   self.eos_ids, self.runner.device)
        except Exception as exc:  # noqa: BLE001 - one request's parameters fail that request only
            _fail(request.future, exc)
            return False
        return True

    @staticmethod
    def _adjust(seq: _Seq, row: torch.Tensor) -> torch.Tensor:
        adjust = seq.request.adjust
        if adjust is None:
            return row
        return adjust.apply_(row, seq.out.token_ids, constrained=seq.constraint is not None)

    def _start(self, request: _Request) -> None:
        """Prefill one request (scoring its prompt when asked) and sample its first tokens."""
        request.started = time.perf_counter()
        p = request.params
        base = len(self.active)
        self.prompt_tokens += len(request.prompt)
        self.prefilled_tokens += len(request.prompt)  # scoring needs every position: no cache
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
        base = len(self.active)
        for b, r in enumerate(requests):
            self._reuse(r, base + b)
        suffixes = [r.prompt[r.cached:] for r in requests]
        width = max(map(len, suffixes))
        tokens = torch.tensor([x + [x[-1]] * (width - len(x)) for x in suffixes], device=device)
        # Row b's tokens sit after its cached prefix; padding past the context's end is clamped
        # onto its last position (junk there is overwritten before any query reads it).
        starts = torch.tensor([[r.cached] for r in requests], device=device)
        positions = (starts + torch.arange(width, device=device)).clamp_(max=self.runner.max_len - 1)
        last = torch.tensor([len(x) - 1 for x in suffixes], device=device)
        logits = self.runner.forward(tokens, positions, base, last=last)
        if self.prefix_cache is not None:  # later requests (and this one's next call) reuse them
            self.prefix_cache.store_many([(r.keys, base + b) for b, r in enumerate(requests)], self.runner.cache)
        self._spawn(requests, logits)

    def _reuse(self, request: _Request, slot: int) -> None:
        """Copy the longest cached prefix of ``request``'s prompt into ``slot``: a whole number
        of blocks, leaving at least one token to prefill (its logits pick the first token)."""
        n = len(request.prompt)
        self.prompt_tokens += n
        cache = self.prefix_cache
        if cache is not None:
            request.keys = cache.hashes(request.prompt)
            ids = cache.lookup(request.keys, (n - 1) // cache.block_size)
            try:
                cache.load(ids, self.runner.slot_view(slot))
            finally:
                cache.release(ids)
            request.cached = len(ids) * cache.block_size
            self.prefix_queries += n
            self.prefix_hits += request.cached
        self.prefilled_tokens += n - request.cached

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
                row = self._adjust(seq, raw.clone())
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
        top_k, top_p) are filtered together; each row draws its uniform from its own seeded
        generator, so a request's samples do not depend on its batch-mates."""
        groups: dict[tuple[float, int, float, float], list[int]] = {}
        for i, s in enumerate(self.active):
            p = s.request.params
            if p.temperature >= SAMPLING_EPS and s.constraint is None:
                groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
        for (temperature, top_k, top_p, min_p), rows in groups.items():
            try:
                filtered = filter_logits(logits[rows] / temperature, top_k, top_p, min_p)
                tokens = draw(torch.softmax(filtered, -1),
                              [self.active[i].request.generators[self.active[i].out.index] for i in rows]).tolist()
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
            stops = seq.request.adjust.min_stops if seq.request.adjust is not None else None
            if stops is not None and len(seq.out.token_ids) < p.min_tokens:
                kept = masked[stops].clone()
                masked[stops] = float("-inf")
                if bool(torch.isneginf(masked).all()):  # the grammar allows only stopping: vLLM lets it
                    masked[stops] = kept
        if greedy is not None and seq.constraint is None:
            token = greedy  # picked for the whole batch by _decode (greedy or sampled)
        elif p.temperature < SAMPLING_EPS:
            token = int(masked.argmax())
        else:
            token = int(draw(torch.softmax(filter_logits((masked / p.temperature)[None], p.top_k, p.top_p, p.min_p), -1),
                             [g])[0])
        out = seq.out
        out.token_ids.append(token)
        if p.logprobs:
            row = torch.log_softmax(logits if raw is None else raw, -1) if logp is None else logp
            out.logprobs.append(TokenIdLogprob(token, float(row[token]), top_logprobs(row, p.top_logprobs)))
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
            out.text = self._text(out.token_ids if p.include_stop_str_in_output else out.token_ids[:-1], p)
        else:
            if live:
                out.text = self._text(out.token_ids, p)
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
                    out.text = self._text(out.token_ids, p)
        if seq.request.on_token is not None:
            try:
                seq.request.on_token(token, out)
            except Exception as exc:  # noqa: BLE001 - a broken listener fails its request only
                _fail(seq.request.future, exc)

    def _text(self, ids: Sequence[int], p: SamplingParams) -> str:
        """The text of ``ids``; ``decode(ids, True)`` leaves special tokens out (a one-argument
        ``decode``, as tests pass, serves requests that keep them)."""
        return self.decode(ids, True) if p.skip_special_tokens else self.decode(ids)

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

    def _keep(self) -> None:
        """Cache finished sequences' full blocks (prompt and answer), so a follow-up call that
        repeats a conversation prefills only what is new: all of this step's at once."""
        cache = self.prefix_cache
        assert cache is not None
        chains: list[tuple[list[bytes], int]] = []
        for slot, seq in enumerate(self.active):
            if seq.out.finish_reason not in ("stop", "length"):
                continue
            r = seq.request
            # The slot holds the prompt and every answer token but the last (sampled, never fed).
            tokens = r.prompt + seq.out.token_ids[:seq.length - len(r.prompt)]
            if len(tokens) // cache.block_size > len(r.keys):
                chains.append((cache.hashes(tokens, r.keys), slot))
        if chains:
            cache.store_many(chains, self.runner.cache)

    def _sweep(self) -> None:
        """Release finished or cancelled sequences; compact the batch; resolve requests."""
        if self.prefix_cache is not None:
            self._keep()  # before compaction moves slots
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
