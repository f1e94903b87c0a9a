"""One evaluation's memory of its deterministic calls.

Strategies of one item can make the very same call: ``sc@16`` and ``bon@16`` draw the same
16 seeded samples (so that the vote and the verifier are compared on identical samples).
With :class:`CallReuse` the first such call
serves every later one (and every one made while it is still in flight), so the model
computes it once. Only calls whose result is fixed by their arguments are shared: greedy
ones (``temperature=0`` given) and seeded ones (``seed`` given). Each run still counts the
call's tokens, which are what its strategy costs, and is credited the time the call took
(less the time it waited for it), so cost and latency read as if each run had made its
own calls. Nothing is written to disk; the memory lasts one evaluation.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from assist.protocol import ChatModel, Messages
from assist.types import ChatCompletion

__all__ = ["CallReuse", "call_key"]


# Arguments given at the value every backend takes when they are left out: a call that
# spells one out is the same call as one that does not.
_DEFAULTS: dict[str, Any] = {"n": 1, "logprobs": False, "top_logprobs": 0, "top_p": 1.0}


def call_key(messages: Messages, kwargs: Mapping[str, Any]) -> str | None:
    """The identity of a call whose result its arguments fix, else None: greedy by request
    (``temperature`` 0; an omitted temperature is the backend's default, often sampling) or
    seeded."""
    greedy = kwargs.get("temperature") == 0
    seeded = kwargs.get("seed") is not None
    if not (greedy or seeded):
        return None
    given = {k: v for k, v in kwargs.items() if v is not None and not (k in _DEFAULTS and v == _DEFAULTS[k])}
    return json.dumps([messages, given], sort_keys=True, default=str)


class CallReuse:
    """Serve a deterministic call made again within one evaluation by the first one.

    ``size`` bounds the calls remembered (least recently used first out): the calls worth
    sharing are those of strategies that run the same item at about the same time.
    """

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.served = 0  # calls answered from an earlier one
        self._calls: OrderedDict[str, asyncio.Future[tuple[ChatCompletion, float]]] = OrderedDict()

    async def chat(self, model: ChatModel, messages: Messages, kwargs: dict[str, Any],
                   ) -> tuple[ChatCompletion, float]:
        """(the completion, seconds to credit to the caller's latency). Every caller gets a
        copy of its own, so one strategy's edits never reach another's."""
        key = call_key(messages, kwargs)
        if key is None:
            return await model.chat(messages, **kwargs), 0.0
        first = self._calls.get(key)
        if first is None:
            task = asyncio.ensure_future(self._timed(model, messages, kwargs))
            self._remember(key, task)
            task.add_done_callback(lambda done: self._forget_failed(key, done))
            # shielded: a first caller that is cancelled leaves the call to the others
            completion, _ = await asyncio.shield(task)
            return completion.model_copy(deep=True), 0.0
        self._calls.move_to_end(key)
        t0 = time.perf_counter()
        completion, took = await asyncio.shield(first)
        self.served += 1
        return completion.model_copy(deep=True), max(0.0, took - (time.perf_counter() - t0))

    @staticmethod
    async def _timed(model: ChatModel, messages: Messages, kwargs: dict[str, Any]) -> tuple[ChatCompletion, float]:
        t0 = time.perf_counter()
        completion = await model.chat(messages, **kwargs)
        return completion, time.perf_counter() - t0

    def _forget_failed(self, key: str, task: asyncio.Future[tuple[ChatCompletion, float]]) -> None:
        """A failed call is not remembered: the next identical call tries again (those that
        were already waiting on it share its failure)."""
        if (task.cancelled() or task.exception() is not None) and self._calls.get(key) is task:
            del self._calls[key]

    def _remember(self, key: str, task: asyncio.Future[tuple[ChatCompletion, float]]) -> None:
        self._calls[key] = task
        while len(self._calls) > self.size:
            self._calls.popitem(last=False)
