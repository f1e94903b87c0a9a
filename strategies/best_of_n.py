"""``bon@k``: best-of-N — sample k candidates, keep the one a scorer ranks highest.

The default scorer is our trained reward model (``rm=runs/tiny/rm`` in the spec, the
``ASSIST_REWARD_MODEL`` environment variable, or a :class:`RewardModel` / any scorer
callable from Python). Candidates come from one ``n=k`` call where the backend supports
it; over an inner strategy (``bon@8(tools)``) they are k runs of it.

Ties: among equally scored candidates, the one whose answer more candidates share wins,
then the earliest. If the scorer fails, the failure is recorded in the trace and the
candidates are majority-voted instead, so a broken scorer costs quality, not the answer.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from dataclasses import dataclass
from typing import Any

from assist._prompts import COT_SUFFIX
from assist.types import Message
from strategies._base import BudgetExhausted, Recorder, Result, StrategyBase, with_suffix
from strategies._candidates import attempt, diversify, sample_choices
from strategies._extract import Extractor
from strategies._prompted import resolve_extractor
from strategies._reward import RewardModel, Scorer
from strategies._spec import register
from strategies.self_consistency import vote

__all__ = ["BestOfN"]

_LOADED: dict[str, RewardModel] = {}  # one copy of each reward model per process


def _reward_model(path: str) -> RewardModel:
    if path not in _LOADED:
        _LOADED[path] = RewardModel(path)
    return _LOADED[path]


@register("bon")
@dataclass(repr=False)
class BestOfN(StrategyBase):
    k: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int | None = None
    rm: str | None = None  # reward-model folder; default: $ASSIST_REWARD_MODEL
    scorer: Scorer | None = None
    extractor: str | Extractor = "default"
    seed: int | None = None
    inner: Any = None
    budget: int | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, not {self.k}")
        self.extract = resolve_extractor(self.extractor)
        self.inner = diversify(self.inner, self.temperature)

    def _scorer(self) -> Scorer:
        if self.scorer is not None:
            return self.scorer
        path = self.rm or os.environ.get("ASSIST_REWARD_MODEL")
        if not path:
            raise ValueError("bon needs a scorer: give rm=PATH in the spec, set ASSIST_REWARD_MODEL, "
                             "or pass scorer=... from Python")
        return _reward_model(path)

    async def solve(self, model: Recorder, messages: list[dict[str, Any]]) -> Result:
        try:
            candidates = await self._candidates(model, messages)
        except BudgetExhausted:
            candidates = []
        if not candidates:
            return model.result(Message(role="assistant", content=""), None)
        texts = [m.content or "" for m, _ in candidates]
        answers = [a for _, a in candidates]
        try:
            scores = await _maybe_await(self._scorer()(messages, texts))
            scores = [float(s) for s in scores]
            if len(scores) != len(texts):
                raise ValueError(f"the scorer returned {len(scores)} scores for {len(texts)} candidates")
        except Exception as exc:  # noqa: BLE001 - a failing scorer falls back to a vote
            winner, tally = vote(answers)
            model.note(step="score", error=f"{type(exc).__name__}: {exc}", fallback="vote", tally=tally)
            chosen = next((i for i, a in enumerate(answers) if a == winner), 0)
            return model.result(candidates[chosen][0], answers[chosen])
        support = {a: answers.count(a) for a in answers if a is not None}
        best = max(range(len(texts)), key=lambda i: (scores[i], support.get(answers[i], 0), -i))
        model.note(step="score", scores=scores, answers=answers, chosen=best)
        return model.result(candidates[best][0], answers[best])

    async def _candidates(self, model: Recorder, messages: list[dict[str, Any]]) -> list[tuple[Message, str | None]]:
        if self.inner is not None:
            seeds = [None if self.seed is None else self.seed + i for i in range(self.k)]
            results = await asyncio.gather(*(attempt(self.inner, s).run(model, messages) for s in seeds))
            return [(r.message, r.answer) for r in results]
        choices = await sample_choices(model, with_suffix(messages, COT_SUFFIX), self.k, seed=self.seed,
                                       temperature=self.temperature, top_p=self.top_p,
                                       max_tokens=self.max_tokens)
        return [(c.message, self.extract(c.message.content or "")) for c in choices]


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
