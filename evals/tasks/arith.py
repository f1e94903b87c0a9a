"""``arith``: GSM8K-style word problems, generated.

A problem is a chain of changes to a starting amount, each marked by its position
("Mia has 347 apples. Mia first buys 58 more. Mia then gives away 79. ..."). The ideal
solution restates each change and computes it with GSM8K's calculator annotation, ending
in ``#### N``::

    Mia has 347 apples.
    Mia first buys 58 more: 347+58=<<347+58=405>>405
    Mia then gives away 79: 405-79=<<405-79=326>>326
    ...
    #### 326

Why this shape (each inference-time strategy meets the failure it fixes):

- Operands have two digits, amounts three. A model of about a million parameters copies them
  reliably (the restated sentence puts each operand beside the arithmetic that uses it)
  but adds and subtracts multi-digit numbers in its head only some of the time: a
  calculator fixes exactly that (``tools``), and ``direct`` (the whole chain in one token
  position) barely works.
- With only ``+`` and ``-`` the changes commute: every order keeps the amount within
  ``0..max_value``, and training solutions apply them in a random order
  (:func:`solution_in_order`). Each order meets different intermediate numbers, so its
  slips differ: sampled paths disagree on wrong answers and agree on the right one, which
  is what self-consistency votes over and what reflection's "solve it again another way"
  checks against.

The knobs (``min_steps``/``max_steps``, ``min_operand``/``max_operand``, ``max_value``,
``ops``) make other variants; with ``*`` the changes no longer commute and solutions keep
the question's order.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

from evals.tasks._base import Sample, Score, Split, Task, check_split
from strategies.extract import gsm8k_strict, normalize

__all__ = [
    "ArithConfig", "ArithTask", "Step", "chain", "orders", "parse_steps", "random_solution",
    "solution_in_order", "solution_text",
]

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
# Step k carries marker k right before its verb ("Mia then gives away 79."), so a solution
# line that restates a step out of order finds the rest of "its" sentence from one unique
# word: the word after the marker is the verb, the number follows the verb. (With the name
# between marker and verb, "First Mia ...", the verb had to be found after "Mia", which
# every sentence shares, and the tiny model restated steps with the wrong verb.)
_MARKERS = ("first", "then", "next", "after that", "later", "finally")
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

    min_steps: int = 3
    max_steps: int = 3
    min_operand: int = 11  # operands of + and - are in min_operand..max_operand
    max_operand: int = 59
    max_value: int = 999  # the start and every intermediate amount, in any order, stay in 0..max_value
    ops: tuple[str, ...] = ("+", "-")
    max_factor: int = 3  # operand of * (only when "*" is in ops)
    test_size: int = 1000
    validation_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError("arith: need 1 <= min_steps <= max_steps")
        if not 1 <= self.min_operand <= self.max_operand <= self.max_value:
            raise ValueError("arith: need 1 <= min_operand <= max_operand <= max_value")
        if not set(self.ops) <= set(_PHRASES) or not self.ops:
            raise ValueError(f"arith: ops must be a non-empty subset of {sorted(_PHRASES)}")

    @property
    def commutes(self) -> bool:
        """Whether solutions may apply the changes in any order."""
        return "*" not in self.ops


def solution_text(sentences: Sequence[str], steps: Sequence[Step], written: Sequence[int] | None = None,
                  order: Sequence[int] | None = None) -> str:
    """The worked solution: each step's sentence restated, then its computation.

    Restating the sentence puts each operand right beside the arithmetic that uses it
    ("Mia buys 3 more: 5+3=<<5+3=8>>8"), so a small model copies locally instead of
    counting sentences back in the question. ``steps[i]`` computes the change of sentence
    ``order[i] + 1`` (default: question order). ``written`` overrides the results written
    (for deliberately flawed attempts); the caller chains later steps from them.
    """
    order = list(order) if order is not None else list(range(len(steps)))
    results = list(written) if written is not None else [s.result for s in steps]
    lines = [sentences[0]]
    for j, step, result in zip(order, steps, results, strict=True):
        e = step.expression
        lines.append(f"{sentences[j + 1].rstrip('.')}: {e}=<<{e}={result}>>{result}")
    return "\n".join(lines) + f"\n#### {results[-1]}"


def chain(start: int, changes: Sequence[tuple[str, int]], order: Sequence[int]) -> list[Step]:
    """The steps that apply ``changes`` to ``start`` in ``order``."""
    steps, value = [], start
    for j in order:
        op, b = changes[j]
        steps.append(Step(value, op, b))
        value = steps[-1].result
    return steps


def orders(sample: Sample) -> list[tuple[int, ...]]:
    """Every order in which a sample's changes may be applied (one unless they commute)."""
    n = len(sample.metadata["changes"])
    return list(itertools.permutations(range(n))) if sample.metadata.get("commutes", False) \
        else [tuple(range(n))]


def solution_in_order(sample: Sample, order: Sequence[int]) -> str:
    """The ideal solution applying the changes in ``order``."""
    changes = [tuple(c) for c in sample.metadata["changes"]]
    steps = chain(sample.metadata["start"], changes, order)
    return solution_text(sample.metadata["sentences"], steps, order=order)


def random_solution(sample: Sample, rng: random.Random) -> str:
    """An ideal solution in one of the sample's orders, drawn uniformly."""
    return solution_in_order(sample, rng.choice(orders(sample)))


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
    def _changes(self, rng: random.Random) -> tuple[int, list[tuple[str, int]]] | None:
        """A start and its changes such that every order stays in 0..max_value, or None."""
        c = self.config
        n_steps = rng.randint(c.min_steps, c.max_steps)
        if not c.commutes:
            return self._ordered_changes(rng, n_steps)
        ops = [rng.choice(c.ops) for _ in range(n_steps)]
        changes = [(op, rng.randint(c.min_operand, c.max_operand)) for op in ops]
        down = sum(b for op, b in changes if op == "-")
        up = sum(b for op, b in changes if op == "+")
        lo, hi = max(c.min_operand, down), c.max_value - up
        if lo > hi:
            return None
        return rng.randint(lo, hi), changes

    def _ordered_changes(self, rng: random.Random, n_steps: int) -> tuple[int, list[tuple[str, int]]] | None:
        c = self.config
        start = value = rng.randint(c.min_operand, c.max_operand)
        changes: list[tuple[str, int]] = []
        for _ in range(100 * n_steps):
            if len(changes) == n_steps:
                break
            op = rng.choice(c.ops)
            if op == "*":
                hi = min(c.max_factor, c.max_value // max(value, 1))
                if hi < 2:
                    continue
                b = rng.randint(2, hi)
            else:
                room = c.max_value - value if op == "+" else value
                hi = min(c.max_operand, room)
                if hi < c.min_operand:
                    continue
                b = rng.randint(c.min_operand, hi)
            changes.append((op, b))
            value = Step(value, op, b).result
        return (start, changes) if len(changes) == n_steps else None

    def _make(self, rng: random.Random, sid: str) -> Sample:
        made = None
        while made is None:
            made = self._changes(rng)
        start, changes = made
        steps = chain(start, changes, range(len(changes)))
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        sentences = [f"{name} has {start} {item}."]
        for i, (op, b) in enumerate(changes):
            phrase = rng.choice(_PHRASES[op]).format(n=b)
            sentences.append(f"{name} {_MARKERS[min(i, len(_MARKERS) - 1)]} {phrase}.")
        sentences.append(f"How many {item} does {name} have now?")
        return Sample(
            id=sid,
            question=" ".join(sentences),
            answer=str(steps[-1].result),
            solution=solution_text(sentences, steps),
            metadata={"steps": [(s.a, s.op, s.b) for s in steps], "name": name, "item": item,
                      "sentences": sentences[:-1], "start": start,
                      "changes": [list(ch) for ch in changes], "commutes": self.config.commutes},
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
    """The steps of a generated sample in question order (for tool and reflection turns)."""
    return [Step(a, op, b) for a, op, b in sample.metadata["steps"]]
