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

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assist.prompts import COT_SUFFIX
from assist.types import Message
from strategies._base import (
    Bound,
    BudgetExhausted,
    OptionError,
    Recorder,
    Result,
    StrategyBase,
    check_common,
    gather,
    with_suffix,
)
from strategies._candidates import attempt, diversify, reported, sample_choices
from strategies._prompted import resolve_extractor
from strategies._reward import RewardModel, Scorer
from strategies._spec import register
from strategies.extract import Extractor
from strategies.voting import vote

__all__ = ["BestOfN"]

_LOADED: dict[str, RewardModel] = {}  # one copy of each reward model per process


def _reward_model(path: str) -> RewardModel:
    key = str(Path(path).resolve())  # "DIR", "DIR/" and "DIR/./" are one model, loaded once
    if key not in _LOADED:
        _LOADED[key] = RewardModel(key)
    return _LOADED[key]


@register("bon", python_only=("scorer",), resources={"rm": "rm"})
@dataclass(repr=False)
class BestOfN(StrategyBase):
    k: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int | None = None
    rm: Any = None  # a reward-model folder (default: $ASSIST_REWARD_MODEL), or a loaded scorer
    scorer: Scorer | None = None
    extractor: str | Extractor = "default"
    seed: int | None = None
    inner: Any = None
    budget: int | None = None

    def __post_init__(self) -> None:
        check_common(self)
        if isinstance(self.rm, int | float) and not isinstance(self.rm, bool):
            self.rm = str(self.rm)  # the spec parser reads "rm=2024" as a number
        if self.rm is not None and not isinstance(self.rm, str | os.PathLike) and not callable(self.rm):
            raise OptionError("rm", f"must be a reward-model folder or a scorer, not {type(self.rm).__name__}")
        if self.scorer is not None and not callable(self.scorer):
            raise OptionError("scorer", f"must be callable, not {type(self.scorer).__name__}")
        self.extract = resolve_extractor(self.extractor)
        self.inner = diversify(self.inner, self.temperature)

    def bound(self, max_tokens: int) -> Bound:
        """k candidates, each a run of the inner strategy."""
        return self.attempt_bound(max_tokens) * self.k

    def _scorer(self) -> Scorer:
        if self.scorer is not None:
            return self.scorer
        if callable(self.rm):  # a reward model loaded beforehand (the server's resources)
            return self.rm  # type: ignore[no-any-return]
        path = self.rm or os.environ.get("ASSIST_REWARD_MODEL")
        if not path:
            raise ValueError("bon needs a scorer: give rm=PATH in the spec, set ASSIST_REWARD_MODEL, "
                             "or pass scorer=... from Python")
        return _reward_model(str(path))

    async def solve(self, model: Recorder, messages: list[dict[str, Any]]) -> Result:
        try:
            candidates = await self._candidates(model, messages)
        except BudgetExhausted:
            candidates = []
        if not candidates:
            return model.result(Message(role="assistant", content=""), None)
        texts = [m.content or "" for m, _ in candidates]
        answers = [a for _, a in candidates]
        model.progress(strategy="bon", samples=len(texts), of=self.k, scoring=True)
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
        support: dict[str | None, int] = {a: answers.count(a) for a in answers if a is not None}
        best = max(range(len(texts)), key=lambda i: (scores[i], support.get(answers[i], 0), -i))
        model.note(step="score", scores=scores, answers=answers, chosen=best)
        return model.result(candidates[best][0], answers[best])

    def _reporter(self, model: Recorder) -> Callable[[str | None], None] | None:
        """When the streaming caller asked for progress: a function to call with each
        candidate's answer as it finishes, which sends the candidates done and their answers
        counted (the scorer decides only once all are in)."""
        if not model.wants_progress:
            return None
        seen: list[str | None] = []

        def report(answer: str | None) -> None:
            seen.append(answer)
            model.progress(strategy="bon", samples=len(seen), of=self.k, tally=vote(seen)[1])

        return report

    async def _candidates(self, model: Recorder, messages: list[dict[str, Any]]) -> list[tuple[Message, str | None]]:
        report = self._reporter(model)
        if self.inner is not None:
            seeds = [None if self.seed is None else self.seed + i for i in range(self.k)]
            done = None if report is None else (lambda r: report(r.answer))
            results = await gather(*(reported(attempt(self.inner, s).run(model, messages), done) for s in seeds))
            return [(r.message, r.answer) for r in results]
        heard = None if report is None else (lambda text: report(self.extract(text)))
        choices = await sample_choices(model, with_suffix(messages, COT_SUFFIX), self.k, seed=self.seed,
                                       temperature=self.temperature, top_p=self.top_p,
                                       max_tokens=self.max_tokens, on_sample=heard)
        return [(c.message, self.extract(c.message.content or "")) for c in choices]


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
