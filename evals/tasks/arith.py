"""``arith``: GSM8K-style word problems, generated.

A problem is a chain of 2–4 steps over small operands, each step opening with a fixed
marker ("Mia has 5 apples. First Mia buys 3 more. Then Mia gives away 4. ..."). The ideal
solution restates each step and computes it with GSM8K's calculator annotation, ending in
``#### N``::

    Mia has 5 apples.
    First Mia buys 3 more: 5+3=<<5+3=8>>8
    Then Mia gives away 4: 8-4=<<8-4=4>>4
    #### 4

Single-digit facts are memorisable by a model of about a million parameters, yet chaining
them makes errors stochastic: the regime where voting, tools and reflection help. The knobs
(``min_steps``/``max_steps``, ``max_operand``, ``max_value``, ``ops``) make harder variants
for a GPU.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from evals.tasks._base import Sample, Score, Split, Task, check_split
from strategies._extract import gsm8k_strict, normalize

__all__ = ["ArithConfig", "ArithTask", "Step"]

_NAMES = (
    "Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eli", "Ana",
    "Tom", "Kai", "Nia", "Raj", "Uma", "Oli", "Ida", "Jon", "Liv", "Pax",
)
_ITEMS = (
    "apples", "marbles", "stickers", "coins", "books", "pencils", "shells", "cards",
    "stamps", "buttons", "cookies", "beads", "rocks", "candles", "kites", "cups",
)
# (operation, phrase): the phrase takes the operand.
_PHRASES = {
    "+": ("buys {n} more", "finds {n} more", "gets {n} from a friend", "wins {n} more",
          "picks up {n} more"),
    "-": ("gives away {n}", "loses {n}", "sells {n}", "uses {n}", "drops {n}"),
    "*": ("makes the pile {n} times as big", "ends up with {n} times as many"),
}
# Step k always opens with marker k, so a solution line finds "its" sentence by one unique
# word instead of by counting sentences (a small model learns that copy much sooner).
_MARKERS = ("First", "Then", "Next", "After that", "Later", "Finally")
_ANNOTATION = re.compile(r"<<(\d+[-+*]\d+)=(-?\d+)>>")


def _evaluate(expression: str) -> int:
    """Value of ``a op b`` (the only form annotations take); no eval()."""
    m = re.fullmatch(r"(\d+)([-+*])(\d+)", expression)
    assert m is not None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return a + b if op == "+" else a - b if op == "-" else a * b


@dataclass(frozen=True)
class Step:
    a: int
    op: str
    b: int

    @property
    def result(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def expression(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    def line(self) -> str:
        """The GSM8K solution line with its calculator annotation."""
        return f"{self.expression}=<<{self.expression}={self.result}>>{self.result}"


@dataclass(frozen=True)
class ArithConfig:
    """Difficulty knobs. The defaults suit the CPU ``tiny`` preset."""

    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 9  # operands of + and - are in 1..max_operand; the start too
    max_value: int = 30  # every intermediate result stays in 0..max_value
    ops: tuple[str, ...] = ("+", "-")
    max_factor: int = 3  # operand of * (only when "*" is in ops)
    test_size: int = 1000
    validation_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError("arith: need 1 <= min_steps <= max_steps")
        if self.max_operand < 1 or self.max_value < self.max_operand:
            raise ValueError("arith: need 1 <= max_operand <= max_value")
        if not set(self.ops) <= set(_PHRASES) or not self.ops:
            raise ValueError(f"arith: ops must be a non-empty subset of {sorted(_PHRASES)}")


def solution_text(sentences: list[str], steps: list[Step], written: list[int] | None = None) -> str:
    """The worked solution: each step's sentence restated, then its computation.

    Restating the sentence puts each operand right beside the arithmetic that uses it
    ("Mia buys 3 more: 5+3=<<5+3=8>>8"), so a small model copies locally instead of
    counting sentences back in the question. ``written`` overrides the results written
    (for deliberately flawed attempts); later steps then start from the written value.
    """
    results = written or [s.result for s in steps]
    lines = [sentences[0]]
    for sentence, step, result in zip(sentences[1:], steps, results, strict=False):
        e = step.expression
        lines.append(f"{sentence.rstrip('.')}: {e}=<<{e}={result}>>{result}")
    return "\n".join(lines) + f"\n#### {results[-1]}"


class ArithTask(Task):
    """Generated multi-step word problems with seeded, disjoint train/validation/test."""

    name = "arith"

    def __init__(self, config: ArithConfig | None = None) -> None:
        self.config = config or ArithConfig()
        self.extractor = gsm8k_strict

    def score(self, sample: Sample, text: str) -> Score:
        """Correct is the final ``#### N``; ``value`` also gives partial credit to wrong answers.

        A wrong answer earns up to 0.5: 0.2 for a parsable final line and 0.3 times the
        share of its calculator annotations that are arithmetically right. The reward model
        learns from these finer rankings; accuracy counts only ``correct``.
        """
        extracted = self.extractor(text)
        correct = extracted is not None and normalize(extracted) == normalize(sample.answer)
        if correct:
            return Score(1.0, True, extracted)
        notes = _ANNOTATION.findall(text)
        right = sum(_evaluate(expr) == int(result) for expr, result in notes)
        value = 0.2 * (extracted is not None) + (0.3 * right / len(notes) if notes else 0.0)
        return Score(round(value, 4), False, extracted)

    # -- generation -------------------------------------------------------------------
    def _steps(self, rng: random.Random) -> list[Step]:
        c = self.config
        n_steps = rng.randint(c.min_steps, c.max_steps)
        value = rng.randint(1, c.max_operand)
        steps: list[Step] = []
        while len(steps) < n_steps:
            op = rng.choice(c.ops)
            if op == "+":
                hi = min(c.max_operand, c.max_value - value)
                if hi < 1:
                    continue
                b = rng.randint(1, hi)
            elif op == "-":
                hi = min(c.max_operand, value)
                if hi < 1:
                    continue
                b = rng.randint(1, hi)
            else:
                hi = min(c.max_factor, c.max_value // max(value, 1))
                if hi < 2:
                    continue
                b = rng.randint(2, hi)
            step = Step(value, op, b)
            steps.append(step)
            value = step.result
        return steps

    def _make(self, rng: random.Random, sid: str) -> Sample:
        steps = self._steps(rng)
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        sentences = [f"{name} has {steps[0].a} {item}."]
        for i, step in enumerate(steps):
            phrase = rng.choice(_PHRASES[step.op]).format(n=step.b)
            lead = f"{_MARKERS[min(i, len(_MARKERS) - 1)]} {name}"
            sentences.append(f"{lead} {phrase}.")
        sentences.append(f"How many {item} does {name} have now?")
        return Sample(
            id=sid,
            question=" ".join(sentences),
            answer=str(steps[-1].result),
            solution=solution_text(sentences, steps),
            metadata={"steps": [(s.a, s.op, s.b) for s in steps], "name": name, "item": item,
                      "sentences": sentences[:-1]},
        )

    @cached_property
    def _held_out(self) -> tuple[list[Sample], list[Sample]]:
        """Test then validation, generated first so that train can exclude them."""
        c = self.config
        seen: set[str] = set()
        out: dict[str, list[Sample]] = {"test": [], "validation": []}
        for split, size in (("test", c.test_size), ("validation", c.validation_size)):
            rng = random.Random(f"arith:{c.seed}:{split}")
            while len(out[split]) < size:
                s = self._make(rng, f"arith-{split}-{len(out[split])}")
                if s.question not in seen:
                    seen.add(s.question)
                    out[split].append(s)
        return out["test"], out["validation"]

    def split(self, split: Split, n: int | None = None) -> list[Sample]:
        split = check_split(split)
        test, validation = self._held_out
        if split == "test":
            return test[:n]
        if split == "validation":
            return validation[:n]
        if n is None:
            raise ValueError("arith: the train split is endless; ask for n samples")
        return self.train_stream("main", n)

    def train_stream(self, name: str, n: int) -> list[Sample]:
        """``n`` training problems from a named stream (one per consumer: SFT, RM, RL, ...).

        Streams are independent draws, so they may repeat each other, but none of them ever
        contains a validation or test question.
        """
        return list(itertools.islice(self.iter_train(name), n))

    def iter_train(self, name: str) -> Iterator[Sample]:
        """The endless form of :meth:`train_stream`."""
        test, validation = self._held_out
        held = {s.question for s in test} | {s.question for s in validation}
        rng = random.Random(f"arith:{self.config.seed}:train:{name}")
        for i in itertools.count():
            s = self._make(rng, f"arith-train-{name}-{i}")
            if s.question not in held:
                yield s


def parse_steps(sample: Sample) -> list[Step]:
    """The steps of a generated sample (for building tool and reflection turns)."""
    return [Step(a, op, b) for a, op, b in sample.metadata["steps"]]
