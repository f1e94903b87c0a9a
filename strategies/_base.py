"""The strategy contract: ``await strategy.run(model, messages) -> Result``.

Every strategy talks to the model through a :class:`Recorder`, which sums usage over all
underlying calls (tokens, calls, wall time), keeps the trace of what was asked and
answered, and enforces a per-request token budget. So a strategy cannot forget to account
for a call, and the endpoint and the eval harness report the same totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from assist.errors import BadRequest
from assist.fanout import gather
from assist.protocol import ChatModel, Messages
from assist.types import ChatCompletion, Message, Usage
from strategies._stream import (
    Delta,
    Done,
    Event,
    Progress,
    Watch,
    current_sink,
    no_sink,
    streamed,
    streamed_chat,
)

__all__ = ["Bound", "BudgetExhausted", "Cost", "Delta", "Done", "Event", "OptionError", "Progress", "Recorder",
           "Result", "Strategy", "StrategyBase", "Watch", "gather", "nodes", "replaced", "run_final",
           "with_fields"]

SEED_LIMIT = 2**62  # seeds get offsets added (seed + i); this leaves room below int64's end


class OptionError(BadRequest):
    """A strategy option of the wrong type or out of range; ``option`` names it (the spec
    parser reports it as the bad parameter). ``message`` is the complaint without the name."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}", param=option)
        self.option = option
        self.message = message


def _shown(value: Any) -> str:
    text = repr(value)  # repr escapes what JSON could not carry (lone surrogates, say)
    return text if len(text) <= 40 else text[:37] + "..."


def need_int(value: Any, option: str, *, lo: int | None = None, hi: int | None = None,
             optional: bool = False) -> int | None:
    """``value`` if it is an int in ``[lo, hi]`` (None too when ``optional``), else OptionError."""
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise OptionError(option, f"must be an integer, not {_shown(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise OptionError(option, f"must be {span}, not {value}")
    return value


def need_number(value: Any, option: str, *, lo: float, hi: float, lo_open: bool = False) -> float:
    """``value`` if it is a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise OptionError(option, f"must be a number, not {_shown(value)}")
    if value > hi or value < lo or (lo_open and value == lo):
        raise OptionError(option, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], not {value:g}")
    return value


def need_bool(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise OptionError(option, f"must be true or false, not {_shown(value)}")


def check_common(strategy: Any) -> None:
    """Check the options many strategies share, where ``strategy`` has them: ``k`` >= 1,
    ``temperature`` in [0, 2], ``top_p`` in (0, 1], ``max_tokens`` and ``budget`` >= 1,
    ``seed`` an integer of at most 2**62 in size. Raises :class:`OptionError`."""
    fields = {f.name for f in dataclasses.fields(strategy)} if dataclasses.is_dataclass(strategy) else set()
    if "k" in fields:
        need_int(strategy.k, "k", lo=1)
    if "temperature" in fields:
        need_number(strategy.temperature, "temperature", lo=0.0, hi=2.0)
    if "top_p" in fields:
        need_number(strategy.top_p, "top_p", lo=0.0, hi=1.0, lo_open=True)
    for name in ("max_tokens", "budget"):
        if name in fields:
            need_int(getattr(strategy, name), name, lo=1, optional=True)
    if "seed" in fields:
        need_int(strategy.seed, "seed", lo=-SEED_LIMIT, hi=SEED_LIMIT, optional=True)


@dataclass(frozen=True)
class Bound:
    """A strategy's worst case for one run: the completions the model may generate (a call
    with ``n=k`` counts k) and the completion tokens they may hold together."""

    calls: int = 1
    tokens: int = 0

    def __add__(self, other: Bound) -> Bound:
        return Bound(self.calls + other.calls, self.tokens + other.tokens)

    def __mul__(self, times: int) -> Bound:
        return Bound(self.calls * times, self.tokens * times)


def call_tokens(strategy: Any, max_tokens: int) -> int:
    """The longest completion one call of ``strategy`` may make: its own ``max_tokens``,
    else ``max_tokens`` (what the caller knows: the request's cap or the context length)."""
    own = getattr(strategy, "max_tokens", None)
    return min(own, max_tokens) if isinstance(own, int) and own > 0 else max_tokens


def bound_of(strategy: Any, max_tokens: int) -> Bound:
    """``strategy.bound(max_tokens)``, or one call for an object without it."""
    bound = getattr(strategy, "bound", None)
    return bound(max_tokens) if callable(bound) else Bound(1, call_tokens(strategy, max_tokens))


class BudgetExhausted(Exception):
    """The request's token budget is spent; the strategy answers with what it has."""


@dataclass
class Cost:
    """What a strategy spent: tokens over every underlying call, the calls, and wall time."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    latency_s: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, usage: Usage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.calls += 1

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "calls": self.calls, "latency_s": round(self.latency_s, 4)}


@dataclass
class Result:
    """A strategy's answer: the final message, its extracted answer, cost, and trace."""

    message: Message
    answer: str | None = None
    usage: Cost = field(default_factory=Cost)
    trace: list[dict[str, Any]] = field(default_factory=list)
    budget_exhausted: bool = False

    @property
    def text(self) -> str:
        return self.message.content or ""

    @property
    def calls(self) -> int:
        return self.usage.calls


class Recorder:
    """A ChatModel wrapper that accounts every call a strategy makes.

    ``budget`` caps the tokens (prompt + completion) all calls together may spend: a call
    is refused once the budget is spent, and a call's ``max_tokens`` is lowered to what is
    left (a call without ``max_tokens`` keeps the model's own limit, so the last call may
    overshoot the budget by its length).
    """

    def __init__(self, model: ChatModel, budget: int | None = None) -> None:
        self.model = model
        self.budget = budget
        self.cost = Cost()
        self.trace: list[dict[str, Any]] = []
        self.exhausted = False
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def supports_n(self) -> bool:
        return self.model.supports_n

    @property
    def left(self) -> int | None:
        return None if self.budget is None else self.budget - self.cost.total_tokens

    @property
    def streaming(self) -> bool:
        """Whether this run's answer is being streamed (a strategy then routes the call that
        writes its answer through :meth:`chat` with ``watch``; under ``run`` it never does)."""
        return current_sink() is not None

    @property
    def wants_progress(self) -> bool:
        """Whether the streaming caller asked for a vote's progress (``stream_progress``)."""
        sink = current_sink()
        return sink is not None and sink.progress

    def emit(self, text: str) -> None:
        """Send more of the answer's text (nothing when not streaming)."""
        sink = current_sink()
        if sink is not None:
            sink.text(text)

    def progress(self, **data: Any) -> None:
        """Send a voting strategy's news (nothing unless the streaming caller asked for it)."""
        sink = current_sink()
        if sink is not None:
            sink.news(data)

    async def chat(self, messages: Messages, *, watch: Watch | None = None, **kwargs: Any) -> ChatCompletion:
        """The model's ``chat``, accounted. With ``watch`` the call is made through the
        model's stream and ``watch`` sees each choice's text as it grows; the completion, the
        usage and the trace entry are the same as without."""
        left = self.left
        if left is not None:
            if left <= 0:
                self.exhausted = True
                raise BudgetExhausted(f"token budget of {self.budget} spent")
            cap = kwargs.get("max_tokens")
            if cap is not None:  # an uncapped call would meet the model's context limit instead
                kwargs["max_tokens"] = min(cap, left)
        t0 = time.perf_counter()
        if watch is None:
            completion = await self.model.chat(messages, **kwargs)
        else:
            completion = await streamed_chat(self.model, messages, watch, **kwargs)
        self.cost.add(completion.usage)
        self.cost.latency_s += time.perf_counter() - t0
        self.trace.append({"step": "call", "n": kwargs.get("n", 1), "temperature": kwargs.get("temperature"),
                           "usage": completion.usage.model_dump(),
                           "texts": completion.texts()})
        return completion

    def note(self, **entry: Any) -> None:
        """Add a strategy-level step (votes, critiques, tool results) to the trace."""
        self.trace.append(entry)

    def result(self, message: Message, answer: str | None) -> Result:
        return Result(message=message, answer=answer, usage=self.cost, trace=self.trace,
                      budget_exhausted=self.exhausted)


@runtime_checkable
class Strategy(Protocol):
    """One object, three front doors: Python, the HTTP endpoint and the eval harness."""

    spec: str

    async def run(self, model: ChatModel, messages: Messages) -> Result: ...


class StrategyBase:
    """Shared plumbing: wall time, the budget, and a sync convenience.

    Subclasses implement :meth:`solve` against a :class:`Recorder`; ``run`` wraps it.
    """

    spec: str = ""
    budget: int | None = None

    def bound(self, max_tokens: int) -> Bound:
        """The worst case of one run (see :class:`Bound`): one call, by default. A call
        that sets no ``max_tokens`` of its own is counted at ``max_tokens``."""
        return Bound(1, call_tokens(self, max_tokens))

    def attempt_bound(self, max_tokens: int) -> Bound:
        """The worst case of one attempt: a run of the ``inner`` strategy where there is one,
        else one call of this strategy's own."""
        inner = getattr(self, "inner", None)
        return bound_of(inner, max_tokens) if inner is not None else StrategyBase.bound(self, max_tokens)

    async def solve(self, model: Recorder, messages: list[dict[str, Any]]) -> Result:
        raise NotImplementedError

    async def run(self, model: ChatModel | Recorder, messages: Messages | str, *, final: bool = False) -> Result:
        """Solve ``messages``. Inside another strategy (``model`` is its Recorder) the run
        streams nothing, unless ``final``: the outer strategy answers with this run's answer
        as it is (``rag(cot)``), so its final stage is this one's."""
        recorder = model if isinstance(model, Recorder) else Recorder(model, self.budget)
        t0 = time.perf_counter()
        start = recorder.cost.latency_s
        if recorder is model and not final:
            with no_sink():
                result = await self.solve(recorder, as_messages(messages))
        else:
            result = await self.solve(recorder, as_messages(messages))
        if recorder is not model:  # the outermost strategy reports its own wall time
            result.usage.latency_s = time.perf_counter() - t0
        else:
            result.usage.latency_s = max(result.usage.latency_s, start)
        return result

    async def stream(self, model: ChatModel | Recorder, messages: Messages | str, *,
                     progress: bool = False) -> AsyncIterator[Event]:
        """Run as :meth:`run` does, yielding the answer's text as its final stage writes it
        (:class:`Delta`), :class:`Progress` of a vote when ``progress``, and last
        :class:`Done` with the Result ``run`` would return. A strategy without a stage to
        stream sends its answer as one delta when it has it. Closing the generator (a client
        that left) cancels the run and every call it has pending."""
        async with contextlib.aclosing(streamed(lambda: self.run(model, messages), progress=progress)) as events:
            async for event in events:
                yield event

    def run_sync(self, model: ChatModel, messages: Messages | str) -> Result:
        """``asyncio.run(self.run(...))`` for scripts and notebooks without a loop."""
        return asyncio.run(self.run(model, messages))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


async def run_final(inner: Any, model: Recorder, messages: Messages) -> Result:
    """Run ``inner`` as the outer strategy's final stage: its answer is the outer answer as
    it is, so a streamed run streams it (a strategy of a plugin's, without ``final``, sends
    its answer whole)."""
    if isinstance(inner, StrategyBase):
        return await inner.run(model, messages, final=True)
    result: Result = await inner.run(model, messages)
    return result


def as_messages(messages: Messages | str) -> list[dict[str, Any]]:
    """A bare string is one user turn."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def with_suffix(messages: Sequence[Mapping[str, Any]], suffix: str) -> list[dict[str, Any]]:
    """The chat with ``suffix`` appended to the last user turn (how cot/direct instruct)."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") == "user":
            content = str(m.get("content") or "")
            if not content.rstrip().endswith(suffix):
                m["content"] = f"{content.rstrip()} {suffix}".strip()
            break
    return out


def nodes(strategy: Any) -> Iterator[Any]:
    """A strategy and the strategies it wraps (``sc@8(tools)`` → sc, tools)."""
    while strategy is not None:
        yield strategy
        strategy = getattr(strategy, "inner", None)


def with_fields(strategy: Any, pick: Callable[[Any], dict[str, Any]]) -> Any:
    """A copy of ``strategy`` whose nodes get the fields ``pick(node)`` returns, where the
    node has them; nodes that change nothing are shared, not copied. The spec is kept."""
    changes = dict(pick(strategy))
    inner = getattr(strategy, "inner", None)
    if inner is not None:
        new_inner = with_fields(inner, pick)
        if new_inner is not inner:
            changes["inner"] = new_inner
    return replaced(strategy, **changes)


def replaced(strategy: Any, **changes: Any) -> Any:
    """A copy of this one node with the ``changes`` it has fields for (the node itself when
    none apply); the spec is kept."""
    if not dataclasses.is_dataclass(strategy) or isinstance(strategy, type):
        return strategy
    names = {f.name for f in dataclasses.fields(strategy) if f.init}
    changes = {k: v for k, v in changes.items() if k in names}
    if not changes:
        return strategy
    spec = getattr(strategy, "spec", "")
    out: Any = dataclasses.replace(strategy, **changes)  # type: ignore[type-var]
    out.spec = spec  # parse() sets the spec on the instance; replace() would drop it
    return out
