"""What every task is: seeded samples in disjoint splits, and a scorer.

The scorer is shared: the eval harness counts ``Score.correct`` and RL uses ``Score.value``
as its reward, so "what we optimise" and "what we measure" are one function.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from strategies.extract import normalize

__all__ = ["Sample", "Score", "Split", "Task", "SPLITS"]

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class Sample:
    """One item: the user's question, the gold answer, and an ideal response if known."""

    id: str
    question: str
    answer: str
    solution: str = ""  # an ideal assistant response (chain of thought ending in `#### answer`)
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    value: float  # the reward in [0, 1]
    correct: bool
    extracted: str | None  # the answer read from the text; None when nothing parsed


class Task(ABC):
    """A deterministic source of samples plus the function that scores a response."""

    name: str
    extractor: Callable[[str], str | None]

    @abstractmethod
    def split(self, split: Split, n: int | None = None) -> list[Sample]:
        """The first ``n`` samples of a split (all of a finite split when ``n`` is None)."""

    @property
    def samples(self) -> Sequence[Sample]:
        """The held-out test split, the default for evaluation."""
        return self.split("test")

    def score(self, sample: Sample, text: str) -> Score:
        extracted = self.extractor(text)
        correct = extracted is not None and normalize(extracted) == normalize(sample.answer)
        return Score(value=1.0 if correct else 0.0, correct=correct, extracted=extracted)


def check_split(split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split  # type: ignore[return-value]
