"""Drawing k candidates: the shared first step of self-consistency and best-of-N."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from assist.protocol import Messages
from assist.types import Choice
from strategies._base import Recorder, Result, Watch, gather, replaced

__all__ = ["attempt", "diversify", "reported", "sample_choices"]


async def sample_choices(model: Recorder, prompt: Messages, k: int, *, seed: int | None = None,
                         on_sample: Callable[[str], None] | None = None, **kwargs: Any) -> list[Choice]:
    """k sampled replies: one ``n=k`` call where the backend honours ``n`` (the prompt is
    prefilled once), otherwise k concurrent calls with seeds ``seed, seed+1, ...``.
    ``on_sample`` (a Recorder only) hears each reply's text as soon as that reply is done,
    in the order they finish: the calls are then made through the model's stream."""
    def watching() -> dict[str, Watch]:
        if on_sample is None:
            return {}

        def watch(index: int, text: str, finish: str | None) -> None:
            if finish is not None:
                on_sample(text)

        return {"watch": watch}

    if model.supports_n:
        return list((await model.chat(prompt, n=k, seed=seed, **kwargs, **watching())).choices)
    seeds = [None if seed is None else seed + i for i in range(k)]
    done = await gather(*(model.chat(prompt, n=1, seed=s, **kwargs, **watching()) for s in seeds))
    return [c.choices[0] for c in done]


async def reported(run: Awaitable[Result], on_done: Callable[[Result], None] | None) -> Result:
    """``await run``, then tell ``on_done`` (an attempt of an inner strategy finished)."""
    result = await run
    if on_done is not None:
        on_done(result)
    return result


def attempt(inner: Any, seed: int | None) -> Any:
    """A copy of ``inner`` seeded for one attempt (so k attempts differ, reproducibly)."""
    return inner if seed is None else replaced(inner, seed=seed)


def diversify(inner: Any, temperature: float) -> Any:
    """The inner strategy sampling at ``temperature`` (attempts of a greedy inner strategy
    would all be the same), keeping its spec."""
    return replaced(inner, temperature=temperature)
