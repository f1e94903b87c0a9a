"""``reflect@R``: attempt, ask the model to check its work, revise — up to R rounds.

The exchange is the one the assistant was trained on: after its attempt the user says
"Check your work step by step."; the assistant checks by solving the problem again another
way (our assistant: the changes in another order, so the check meets other numbers than
the attempt did). Agreement ends with "The answer stands." (done); disagreement ends with
a ``Corrected:`` solution, which becomes the next attempt. Other models
get the same plain-English request; a reply without either marker that carries an answer
counts as a revision. ``critic`` (Python) lets a different model do the checking; the
attempt can come from an inner strategy (``reflect(rag)``, ``reflect(tools)``).
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
    check_common,
)
from strategies._prompted import resolve_extractor
from strategies._spec import register
from strategies.extract import Extractor

__all__ = ["Reflect", "revision"]

CORRECTED = "Corrected:"


def revision(check: str) -> str | None:
    """The revised solution a check proposes, or None when the answer stands."""
    if REFLECT_STANDS.lower() in check.lower():
        return None
    at = check.find(CORRECTED)
    return check[at + len(CORRECTED):].strip() if at >= 0 else check.strip()


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
            try:
                check = (await critic.chat(convo, temperature=self.temperature, seed=self.seed,
                                           max_tokens=self.max_tokens)).text
            except BudgetExhausted:
                break
            revised = revision(check)
            new_answer = self.extract(revised) if revised else None
            model.note(step="reflect", round=round_ + 1, check=check, stands=revised is None,
                       answer_before=answer, answer_after=new_answer if revised else answer)
            if revised is None or new_answer is None:  # stands, or a check with nothing to use
                break
            attempt, answer = Message(role="assistant", content=revised), new_answer
        if critic is not model:  # a separate critic's spending is part of this request's cost
            model.cost.prompt_tokens += critic.cost.prompt_tokens
            model.cost.completion_tokens += critic.cost.completion_tokens
            model.cost.calls += critic.cost.calls
        return model.result(attempt, answer)

    async def _attempt(self, model: Recorder, messages: list[dict[str, Any]]) -> Message:
        if self.inner is not None:
            return (await self.inner.run(model, messages)).message
        completion = await model.chat(messages, temperature=self.temperature, max_tokens=self.max_tokens,
                                      seed=self.seed)
        return completion.choices[0].message
