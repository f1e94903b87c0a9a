"""CallReuse: a greedy or seeded call made again within one evaluation is computed once,
and every run still counts its tokens and its time (evals/_reuse.py, evaluate(reuse_calls=))."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from rich.console import Console

import strategies
from assist.errors import AssistError
from assist.testing import FakeChatModel
from evals import _reuse
from evals._reuse import CallReuse, call_key
from evals.harness import SAMPLES, evaluate, read_records
from evals.tasks import ArithTask

ASK = [{"role": "user", "content": "What is 2+3?"}]


def counting(reply: str = "5") -> FakeChatModel:
    return FakeChatModel(respond=lambda messages, kwargs: f"{reply} seed={kwargs.get('seed')}")


def test_only_calls_their_arguments_fix_are_shared():
    assert call_key(ASK, {"temperature": 0.0}) is not None  # greedy, asked for
    assert call_key(ASK, {"temperature": 0.7, "seed": 3}) is not None  # seeded sampling
    assert call_key(ASK, {"temperature": 0.7}) is None  # a fresh draw each time
    assert call_key(ASK, {"max_tokens": 9}) is None  # the backend's default temperature may sample
    assert call_key(ASK, {"temperature": 0.7, "seed": 3}) != call_key(ASK, {"temperature": 0.7, "seed": 4})
    assert call_key(ASK, {"seed": 1, "n": 4}) != call_key(ASK, {"seed": 1, "n": 8})
    # spelling out what every backend assumes is the same call (sc passes logprobs=False, bon not)
    assert call_key(ASK, {"seed": 1, "logprobs": False, "max_tokens": None, "top_p": 1.0}) == call_key(ASK, {"seed": 1})
    assert call_key(ASK, {"seed": 1, "logprobs": True}) != call_key(ASK, {"seed": 1})


def test_a_repeated_deterministic_call_is_computed_once_and_each_caller_gets_its_own_copy():
    async def go() -> None:
        model, reuse = counting(), CallReuse()
        first, credit_first = await reuse.chat(model, ASK, {"temperature": 0.7, "seed": 1, "n": 2})
        first.choices[0].message.content = "edited by the first strategy"
        again, _ = await reuse.chat(model, ASK, {"temperature": 0.7, "seed": 1, "n": 2})
        assert len(model.calls) == 1 and reuse.served == 1 and credit_first == 0.0
        assert [c.message.content for c in again.choices] == ["5 seed=1", "5 seed=1"]
        assert again.usage == first.usage  # the tokens the strategy costs are still counted
        await reuse.chat(model, ASK, {"temperature": 0.7, "seed": 2, "n": 2})  # another draw
        await reuse.chat(model, ASK, {"temperature": 0.7, "n": 2})  # unseeded: never shared
        await reuse.chat(model, ASK, {"temperature": 0.7, "n": 2})
        assert len(model.calls) == 4 and reuse.served == 1

    asyncio.run(go())


class _Gated:
    """A model whose calls wait for ``gate`` and take ``took`` seconds of a fake clock."""

    name, supports_n = "gated", True

    def __init__(self, clock: list[float], took: float, fail_first: bool = False) -> None:
        self.clock, self.took, self.fail_first = clock, took, fail_first
        self.gate = asyncio.Event()
        self.calls = 0

    async def chat(self, messages: Any, **kwargs: Any) -> Any:
        self.calls += 1
        await self.gate.wait()
        self.clock[0] += self.took
        if self.fail_first and self.calls == 1:
            raise AssistError("the server went away")
        return await counting().chat(messages, **kwargs)


def test_callers_in_flight_share_the_call_and_are_credited_the_time_they_did_not_wait(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(_reuse.time, "perf_counter", lambda: clock[0])

    async def go() -> None:
        model, reuse = _Gated(clock, took=2.0), CallReuse()
        kwargs = {"temperature": 0.0, "max_tokens": 8}
        first = asyncio.ensure_future(reuse.chat(model, ASK, dict(kwargs)))
        for _ in range(3):  # the first call is in flight, waiting at the model's gate
            await asyncio.sleep(0)
        assert model.calls == 1
        clock[0] += 0.5  # the second caller comes half a second later
        second = asyncio.ensure_future(reuse.chat(model, ASK, dict(kwargs)))
        await asyncio.sleep(0)
        model.gate.set()
        (a, credit_a), (b, credit_b) = await asyncio.gather(first, second)
        assert model.calls == 1 and a.choices[0].message.content == b.choices[0].message.content
        # the call ran from 100.0 to 102.5; the second caller, there from 100.5, waited 2.0 s of it
        assert credit_a == 0.0 and credit_b == pytest.approx(0.5)
        _, credit_c = await reuse.chat(model, ASK, dict(kwargs))  # later: served at once
        assert model.calls == 1 and credit_c == pytest.approx(2.5)

    asyncio.run(go())


def test_a_failed_call_is_not_remembered():
    async def go() -> None:
        model, reuse = _Gated([0.0], took=0.0, fail_first=True), CallReuse()
        model.gate.set()
        with pytest.raises(AssistError):
            await reuse.chat(model, ASK, {"seed": 5})
        again, _ = await reuse.chat(model, ASK, {"seed": 5})  # tried again, and it works
        assert model.calls == 2 and again.choices[0].message.content == "5 seed=5"

    asyncio.run(go())


def test_the_memory_is_bounded():
    async def go() -> None:
        model, reuse = counting(), CallReuse(size=1)
        for seed in (1, 2, 1):  # seed 1 was pushed out by seed 2
            await reuse.chat(model, ASK, {"seed": seed})
        assert len(model.calls) == 3 and reuse.served == 0
    asyncio.run(go())
    with pytest.raises(ValueError):
        CallReuse(size=0)


@pytest.mark.parametrize("reuse_calls", [False, True])
def test_evaluate_computes_strategies_shared_samples_once(tmp_path, reuse_calls):
    """Two strategies that draw the same seeded samples of an item (as sc@16 and bon@16 do):
    with reuse the model computes them once, and both records read as without it."""
    task = ArithTask()
    items = task.split("test", 3)
    model = FakeChatModel(respond=lambda messages, kwargs: f"so it is #### {kwargs['seed'] % 5}")
    specs = {"vote": strategies.parse("sc@4:t=0.7"), "vote again": strategies.parse("sc@4:t=0.7")}
    records = asyncio.run(evaluate(model, task, specs, items, seed=7, out=tmp_path, progress=False,
                                   console=Console(file=None, quiet=True), reuse_calls=reuse_calls))
    assert len(model.calls) == (3 if reuse_calls else 6)  # one n=4 call per item and strategy
    by = {(r["strategy"], r["item"]): r["runs"][0] for r in read_records(tmp_path / SAMPLES)}
    assert len(records) == 6
    for item in items:
        a, b = by[("vote", item.id)], by[("vote again", item.id)]
        assert a["completion_tokens"] == b["completion_tokens"] > 0 and a["answer"] == b["answer"]
        assert a["latency_s"] >= 0 and b["latency_s"] >= 0
