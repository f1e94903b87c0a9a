"""``sc@k``: self-consistency — sample k reasoning paths and take the majority answer.

One call with ``n=k`` where the backend supports it (the prompt is prefilled once and
shared), otherwise k concurrent calls. Over an inner strategy (``sc@8(tools)``) the k
attempts are k runs of that strategy at this temperature.

Tie rule (deterministic, documented): among answers with the same vote, the one that
appeared first in sample order wins. Samples without a parsable answer do not vote.
With ``weighted=true`` each vote counts ``exp(mean token logprob)`` of its sample instead
of 1. With ``early_stop=true`` samples are drawn in rounds of ``step`` and sampling stops
once the vote is decided (adaptive consistency). ``confidence=1`` (the default) waits
until the leader can no longer be overtaken by the votes still to come: the answer is
then the one all k samples would give, but it cannot stop before a majority of k is in.
``confidence=c < 1`` stops as soon as the leader's lead is significant: with the leader's
and the runner-up's votes v1, v2 and a uniform prior on their share, the posterior
Beta(v1 + 1, v2 + 1) puts probability at least c on the leader being the more frequent
answer (Aggarwal et al., 2023, "Let's Sample Step by Step": Adaptive-Consistency's
Beta criterion); 4-0 is 0.97, 3-1 is 0.81, 7-1 is 0.98.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from assist.prompts import COT_SUFFIX
from assist.types import Choice, Message
from strategies._base import (
    Bound,
    BudgetExhausted,
    Recorder,
    Result,
    StrategyBase,
    check_common,
    gather,
    need_bool,
    need_int,
    need_number,
    with_suffix,
)
from strategies._candidates import attempt, diversify, reported, sample_choices
from strategies._prompted import resolve_extractor
from strategies._spec import register
from strategies.extract import Extractor
from strategies.voting import vote

__all__ = ["SelfConsistency", "leader_probability"]


def _confidence(choice: Choice) -> float:
    tokens = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
    if not tokens:
        return 1.0
    return math.exp(sum(t.logprob for t in tokens) / len(tokens))


def leader_probability(v1: int, v2: int) -> float:
    """P(x > 1/2) for x ~ Beta(v1 + 1, v2 + 1): how sure the votes make us that the leader
    (v1 votes) is more frequent than the runner-up (v2). For integer parameters that is
    P(Binomial(v1 + v2 + 1, 1/2) <= v1), an exact sum (votes are few)."""
    n = v1 + v2 + 1
    return sum(math.comb(n, i) for i in range(v1 + 1)) / 2**n


@register("sc")
@dataclass(repr=False)
class SelfConsistency(StrategyBase):
    k: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = None
    extractor: str | Extractor = "default"
    weighted: bool = False
    early_stop: bool = False
    step: int = 0  # round size with early_stop (0: k // 4, at least 2)
    confidence: float = 1.0  # early_stop's rule: 1 = the leader is safe, < 1 = the Beta criterion
    seed: int | None = None
    inner: Any = None
    budget: int | None = None

    def __post_init__(self) -> None:
        check_common(self)
        self.weighted = need_bool(self.weighted, "weighted")
        self.early_stop = need_bool(self.early_stop, "early_stop")
        need_int(self.step, "step", lo=0)
        need_number(self.confidence, "confidence", lo=0.5, hi=1.0)
        self.extract = resolve_extractor(self.extractor)
        self.inner = diversify(self.inner, self.temperature)

    def bound(self, max_tokens: int) -> Bound:
        """k samples (early stopping may draw fewer), each a run of the inner strategy."""
        return self.attempt_bound(max_tokens) * self.k

    async def solve(self, model: Recorder, messages: list[dict[str, Any]]) -> Result:
        messages_out: list[Message] = []
        answers: list[str | None] = []
        weights: list[float] = []
        step = self.k if not self.early_stop else max(2, self.step or self.k // 4)
        stopped_early = False
        try:
            while len(answers) < self.k:
                size = min(step, self.k - len(answers))
                batch = await self._sample(model, messages, size, answers)
                for message, answer, weight in batch:
                    messages_out.append(message)
                    answers.append(answer)
                    weights.append(weight)
                if self.early_stop and len(answers) < self.k and self._decided(answers):
                    stopped_early = True
                    break
        except BudgetExhausted:
            pass
        winner, tally = vote(answers, weights if self.weighted else None)
        model.note(step="vote", answers=answers, tally=tally, winner=winner, samples=len(answers),
                   early_stop=stopped_early)
        if not messages_out:
            return model.result(Message(role="assistant", content=""), None)
        chosen = next((m for m, a in zip(messages_out, answers, strict=True) if a == winner), messages_out[0])
        return model.result(chosen, winner)

    def _decided(self, answers: list[str | None]) -> bool:
        counts = sorted(vote(answers)[1].values(), reverse=True) + [0.0, 0.0]
        if counts[0] > counts[1] + (self.k - len(answers)):
            return True  # the leader is safe, whatever the rest say
        return self.confidence < 1.0 and counts[0] > 0 and \
            leader_probability(int(counts[0]), int(counts[1])) >= self.confidence

    def _reporter(self, model: Recorder, answers: list[str | None]) -> Callable[[str | None], None] | None:
        """When the streaming caller asked for progress: a function to call with each
        sample's answer as it finishes (``answers``: those of earlier rounds), which sends
        the samples done and the tally so far (unweighted: weights come with the vote)."""
        if not model.wants_progress:
            return None
        seen = list(answers)

        def report(answer: str | None) -> None:
            seen.append(answer)
            winner, tally = vote(seen)
            model.progress(strategy="sc", samples=len(seen), of=self.k, tally=tally, leader=winner)

        return report

    async def _sample(self, model: Recorder, messages: list[dict[str, Any]], size: int,
                      before: list[str | None]) -> list[tuple[Message, str | None, float]]:
        """``size`` more samples; ``before``: the answers of the rounds drawn so far."""
        offset = len(before)
        report = self._reporter(model, before)
        if self.inner is not None:
            seeds = [None if self.seed is None else self.seed + offset + i for i in range(size)]
            done = None if report is None else (lambda r: report(r.answer))
            results = await gather(*(reported(attempt(self.inner, s).run(model, messages), done) for s in seeds))
            return [(r.message, r.answer, 1.0) for r in results]
        # A weighted vote needs each sample's logprobs, which a stream does not put back
        # together: its progress comes per round instead of per sample.
        heard = None if report is None or self.weighted else (lambda text: report(self.extract(text)))
        choices = await sample_choices(model, with_suffix(messages, COT_SUFFIX), size,
                                       seed=None if self.seed is None else self.seed + offset,
                                       temperature=self.temperature, top_p=self.top_p,
                                       max_tokens=self.max_tokens, logprobs=self.weighted, on_sample=heard)
        out = [(c.message, self.extract(c.message.content or ""), _confidence(c)) for c in choices]
        if report is not None and heard is None:
            for _, answer, _ in out:
                report(answer)
        return out
