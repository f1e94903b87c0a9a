"""One call with an instruction appended: the shared body of ``direct`` and ``cot``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strategies._base import (
    OptionError,
    Recorder,
    Result,
    StrategyBase,
    Watch,
    check_common,
    with_suffix,
)
from strategies.extract import EXTRACTORS, Extractor

__all__ = ["Prompted", "final_stage", "resolve_extractor"]


def final_stage(model: Recorder) -> dict[str, Watch]:
    """The keyword that streams a call whose whole text is the answer: ``watch`` sending
    each piece as it comes, when the run is streamed; nothing (a plain call) otherwise."""
    if not model.streaming:
        return {}
    sent = [0]

    def watch(index: int, text: str, finish: str | None) -> None:
        if index == 0 and len(text) > sent[0]:
            model.emit(text[sent[0]:])
            sent[0] = len(text)

    return {"watch": watch}


def resolve_extractor(extractor: str | Extractor) -> Extractor:
    if callable(extractor):
        return extractor
    if not isinstance(extractor, str) or extractor not in EXTRACTORS:
        raise OptionError("extractor", f"must be one of {', '.join(EXTRACTORS)}, not {extractor!r}"[:200])
    return EXTRACTORS[extractor]


@dataclass(repr=False)
class Prompted(StrategyBase):
    """Greedy by default, and says so: servers differ in their default temperature."""

    suffix: str = ""
    temperature: float = 0.0
    max_tokens: int | None = None
    extractor: str | Extractor = "default"
    seed: int | None = None  # sampled runs (t > 0) reproduce; the eval harness sets it per run
    budget: int | None = None

    def __post_init__(self) -> None:
        check_common(self)
        if not isinstance(self.suffix, str):
            raise OptionError("suffix", f"must be text, not {type(self.suffix).__name__}")
        self.extract = resolve_extractor(self.extractor)

    def request(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return with_suffix(messages, self.suffix) if self.suffix else messages

    async def solve(self, model: Recorder, messages: list[dict[str, Any]]) -> Result:
        completion = await model.chat(self.request(messages), temperature=self.temperature,
                                      max_tokens=self.max_tokens, seed=self.seed, **final_stage(model))
        message = completion.choices[0].message
        return model.result(message, self.extract(message.content or ""))
