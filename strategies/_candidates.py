"""Drawing k candidates: the shared first step of self-consistency and best-of-N."""

from __future__ import annotations

from typing import Any

from assist.protocol import ChatModel, Messages
from assist.types import Choice
from strategies._base import gather, replaced

__all__ = ["attempt", "diversify", "sample_choices"]


async def sample_choices(model: ChatModel, prompt: Messages, k: int, *, seed: int | None = None,
                         **kwargs: Any) -> list[Choice]:
    """k sampled replies: one ``n=k`` call where the backend honours ``n`` (the prompt is
    prefilled once), otherwise k concurrent calls with seeds ``seed, seed+1, ...``."""
    if model.supports_n:
        return list((await model.chat(prompt, n=k, seed=seed, **kwargs)).choices)
    seeds = [None if seed is None else seed + i for i in range(k)]
    done = await gather(*(model.chat(prompt, n=1, seed=s, **kwargs) for s in seeds))
    return [c.choices[0] for c in done]


def attempt(inner: Any, seed: int | None) -> Any:
    """A copy of ``inner`` seeded for one attempt (so k attempts differ, reproducibly)."""
    return inner if seed is None else replaced(inner, seed=seed)


def diversify(inner: Any, temperature: float) -> Any:
    """The inner strategy sampling at ``temperature`` (attempts of a greedy inner strategy
    would all be the same), keeping its spec."""
    return replaced(inner, temperature=temperature)
