"""``reflect@R``: attempt, ask the model to check its work, revise — up to R rounds.

The exchange is the one the assistant was trained on: after its attempt the user says
"Check your work step by step."; the assistant checks by solving the problem again another
way (our assistant: the changes in another order, so the check meets other numbers than
the attempt did). Agreement ends with "The answer stands." (done); disagreement ends with
a ``Corrected:`` solution, which becomes the next attempt. Other models
get the same plain-English request; a reply without either marker that carries an answer
counts as a revision. ``critic`` (Python) lets a different model do the checking; the
attempt can come from an inner strategy (``reflect(rag)``, ``reflect(tools)``).

A check's verdict is its first marker, so it is settled the moment the marker is written:
"The answer stands." before any ``Corrected:`` keeps the attempt; ``Corrected:`` first
makes what follows the next attempt, whatever comes after it (even a revision with no
answer in it: the model said the attempt was wrong). That is what lets ``stream`` send
the last round's revision token by token as the check writes it, and an attempt that
stands as soon as the check says so, and still send exactly what ``run`` answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from assist.prompts import REFLECT_PROMPT, REFLECT_STANDS
from assist.protocol import ChatModel
from assist.types import Message
from strategies._base import (
    Bound,
    BudgetExhausted,
    OptionError,
    Recorder,
    Result,
    StrategyBase,
    Watch,
    check_common,
)
from strategies._prompted import resolve_extractor
from strategies._spec import register
from strategies.extract import Extractor

__all__ = ["Reflect", "revision", "verdict"]

CORRECTED = "Corrected:"


def verdict(check: str) -> tuple[str | None, int]:
    """(``"stands"``, ``"corrected"`` or None, where the revision starts): the check's first
    marker. Settled as soon as that marker is in the text, however the check goes on."""
    stands = check.lower().find(REFLECT_STANDS.lower())
    at = check.find(CORRECTED)
    if stands >= 0 and (at < 0 or stands < at):
        return "stands", -1
    if at >= 0:
        return "corrected", at + len(CORRECTED)
    return None, 0


def revision(check: str) -> str | None:
    """The revised solution a check proposes, or None when the answer stands."""
    said, start = verdict(check)
    return None if said == "stands" else check[start:].strip()


@register("reflect", python_only=("critic",))
@dataclass(repr=False)
class Reflect(StrategyBase):
    k: int = 1  # rounds of check-and-revise (spec: reflect@2)
    temperature: float = 0.0
    seed: int | None = None  # sampled runs (t > 0) reproduce
    max_tokens: int | None = None
    extractor: str | Extractor = "default"
    critic: ChatModel | None = None
    inner: Any = None
    budget: int | None = None

    def __post_init__(self) -> None:
        check_common(self)
        if self.critic is not None and not callable(getattr(self.critic, "chat", None)):
            raise OptionError("critic", f"must be a chat model, not {type(self.critic).__name__}")
        self.extract = resolve_extractor(self.extractor)

    def bound(self, max_tokens: int) -> Bound:
        """The attempt (one call, or a run of the inner strategy), then one check per round."""
        return self.attempt_bound(max_tokens) + super().bound(max_tokens) * self.k

    async def solve(self, model: Recorder, messages: list[dict[str, Any]]) -> Result:
        try:
            attempt = await self._attempt(model, messages)
        except BudgetExhausted:
            return model.result(Message(role="assistant", content=""), None)
        answer = self.extract(attempt.content or "")
        critic = Recorder(self.critic) if self.critic is not None else model
        for round_ in range(self.k):
            convo = [*messages, {"role": "assistant", "content": attempt.content or ""},
                     {"role": "user", "content": REFLECT_PROMPT}]
            watch = self._watch(model, attempt.content or "", last=round_ == self.k - 1)
            try:
                check = (await critic.chat(convo, temperature=self.temperature, seed=self.seed,
                                           max_tokens=self.max_tokens, **watch)).text
            except BudgetExhausted:
                break
            revised = revision(check)
            new_answer = self.extract(revised) if revised else None
            model.note(step="reflect", round=round_ + 1, check=check, stands=revised is None,
                       answer_before=answer, answer_after=new_answer if revised else answer)
            if revised is None:
                break
            if new_answer is None and verdict(check)[0] is None:  # an unmarked reply with nothing to use
                break
            attempt, answer = Message(role="assistant", content=revised), new_answer
            if new_answer is None:  # a marked revision without an answer: nothing left to check
                break
        if critic is not model:  # a separate critic's spending is part of this request's cost
            model.cost.prompt_tokens += critic.cost.prompt_tokens
            model.cost.completion_tokens += critic.cost.completion_tokens
            model.cost.calls += critic.cost.calls
        return model.result(attempt, answer)

    def _watch(self, model: Recorder, attempt: str, *, last: bool) -> dict[str, Watch]:
        """When streamed: send the attempt once a check says it stands, and the last
        round's revision as the check writes it (its surrounding whitespace is held, as
        ``revision`` strips it). An unmarked reply is settled only at its end: nothing here."""
        if not model.streaming:
            return {}
        sent = [0]
        done = [False]

        def watch(index: int, text: str, finish: str | None) -> None:
            if index or done[0]:
                return
            said, start = verdict(text)
            if said == "stands":
                model.emit(attempt)
                done[0] = True
            elif said == "corrected" and last:
                ready = text[start:].strip()
                if len(ready) > sent[0]:
                    model.emit(ready[sent[0]:])
                    sent[0] = len(ready)

        return {"watch": watch}

    async def _attempt(self, model: Recorder, messages: list[dict[str, Any]]) -> Message:
        if self.inner is not None:
            return (await self.inner.run(model, messages)).message
        completion = await model.chat(messages, temperature=self.temperature, max_tokens=self.max_tokens,
                                      seed=self.seed)
        return completion.choices[0].message
