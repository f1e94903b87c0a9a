"""``facts``: questions about a generated, fictional world.

The knowledge base holds ``n_entities`` kingdoms, each with a capital, a language, a
currency and a founding year, all invented (so no real model knows them either). The
kingdoms' names are new words; so are their values, or (``vocabulary`` > 0) the capitals,
languages and currencies are drawn from a small vocabulary of such words, as real ones are
words a reader has met before. Each kingdom is rendered as a short encyclopedia passage
with a stable id (``kb-17``).

Only the *seen* part of the world appears in pretraining text (each exposure worded
afresh, :meth:`FactsTask.passage` with an ``rng``, so the facts are stored as facts and not
as one memorised string); the *unseen* part exists only in the passages, so a model can
answer it only with retrieval. That split is how retrieval augmentation is measured:
closed-book on unseen facts is chance, open-book is reading comprehension. Reading is
taught on *practice* kingdoms (:meth:`FactsTask.practice`), drawn fresh for every
conversation and never part of the world, so the model cannot answer them from memory and
must copy from the passage.

Splits: each seen (kingdom, attribute) pair is either a train or a test question, never
both; every unseen pair is a test question; validation is drawn from seen-train kingdoms'
held-back pairs. An answer's final line states the fact, ``#### Its capital is Taike.``: the
value is read out of it (:func:`fact_answer`), and a line counts only when it is the bare
value or a wording of the asked attribute (:meth:`FactsTask.score`). Why not ``#### Taike``
after the sentence, like arith: a small model writes the sentence right and then fails to
copy a word value down to the line (README: Retrieval).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

from evals.tasks._base import Sample, Score, Split, Task, check_split
from strategies.extract import final_line, normalize, without_citations

__all__ = ["ATTRIBUTES", "Entity", "FactsConfig", "FactsTask", "fact_answer"]

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br",
           "dr", "kr", "st", "tr", "sh", "gl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_WORDS = ("capital", "language", "currency")  # the attributes whose values are words
_CODAS = ("", "", "n", "r", "s", "l", "th", "m", "k")

ATTRIBUTES: dict[str, str] = {
    "capital": "What is the capital of {e}?",
    "language": "What language do people speak in {e}?",
    "currency": "What is the currency of {e}?",
    "founded": "In what year was {e} founded?",
}
# The canonical wording of a fact in a passage: it names the kingdom, so a passage on its
# own says whose fact it is (and the fact is stored under the name in pretraining).
_STATEMENT = {
    "capital": "The capital of {e} is {v}",
    "language": "People in {e} speak {v}",
    "currency": "The currency of {e} is the {v}",
    "founded": "{e} was founded in {v}",
}
# How an answer states a fact: without the kingdom's name. Restating an invented name (several
# BPE pieces) before the value is where a small model lost most open-book answers: the
# tiny model wrote the name right in 74 of 240 and then read the wrong value; with the
# name-free answer the same base answered 76% of unseen questions from the passage instead
# of 42% (README: Retrieval). The phrase before the value is still one a passage uses.
_CLAIM = {
    "capital": "Its capital is {v}",
    "language": "People there speak {v}",
    "currency": "Its currency is the {v}",
    "founded": "It was founded in {v}",
}
# Other wordings, mixed into fresh passages (pretraining) a third of the time.
_SENTENCES: dict[str, tuple[str, ...]] = {
    "capital": ("Its capital is {v}.", "The capital city is {v}."),
    "language": ("People there speak {v}.", "The language of {e} is {v}."),
    "currency": ("Its currency is the {v}.", "Trade in {e} uses the {v}."),
    "founded": ("It was founded in {v}.", "{e} was founded in the year {v}."),
}


def _final_statement(text: str) -> tuple[str, str] | None:
    """(the words before the value, the value) of the final line, citations dropped."""
    line = final_line(text)
    if line is None:
        return None
    words = without_citations(line).strip().rstrip(".").split()
    return (" ".join(words[:-1]), words[-1]) if words else None


def fact_answer(text: str) -> str | None:
    """The value of the final line: ``#### Taike`` or ``#### Its capital is Taike [kb-7].``
    both read ``Taike`` (its last word, a citation and the period dropped)."""
    stated = _final_statement(text)
    return stated[1] if stated else None


@dataclass(frozen=True)
class Entity:
    id: str  # the passage id, e.g. "kb-17"
    name: str
    capital: str
    language: str
    currency: str
    founded: str
    seen: bool

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))


@dataclass(frozen=True)
class FactsConfig:
    n_entities: int = 120  # a world a model of a million parameters can memorise half of
    seen_fraction: float = 0.5
    test_fraction: float = 0.35  # of each seen kingdom's attributes held out for test
    # Words a capital (a language, a currency) can be; 0: every value a new word of its own.
    vocabulary: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_entities < 10:
            raise ValueError("facts: n_entities must be at least 10")
        if self.vocabulary < 0 or self.vocabulary == 1:
            raise ValueError("facts: vocabulary must be 0 (every value new) or at least 2")
        if not 0.0 < self.seen_fraction < 1.0:
            raise ValueError("facts: seen_fraction must be in (0, 1)")


class FactsTask(Task):
    """Closed-book or retrieval questions over a generated knowledge base."""

    name = "facts"

    def __init__(self, config: FactsConfig | None = None) -> None:
        self.config = config or FactsConfig()
        self.extractor = fact_answer
        self._used: set[str] = set()  # the world's words: vocabulary first, then names

    # -- the world ---------------------------------------------------------------------
    @cached_property
    def entities(self) -> list[Entity]:
        vocabulary = self.vocabulary  # reserved first: no kingdom is named like a value
        rng = random.Random(f"facts:{self.config.seed}:world")
        n = self.config.n_entities
        seen_ids = sorted(rng.sample(range(n), round(n * self.config.seen_fraction)))
        if not vocabulary:  # every value a new word
            return [self._entity(rng, f"kb-{i}", i in seen_ids) for i in range(n)]
        # Seen kingdoms take every value word in turn (each pretrained on), the unseen any.
        decks = {a: [words[i % len(words)] for i in range(len(seen_ids))] for a, words in vocabulary.items()}
        for deck in decks.values():
            rng.shuffle(deck)
        seen_values = {i: {a: deck[j] for a, deck in decks.items()} for j, i in enumerate(seen_ids)}
        return [self._entity(rng, f"kb-{i}", i in seen_values, values=seen_values.get(i)) for i in range(n)]

    def _word(self, rng: random.Random, syllables: int, reserve: bool) -> str:
        """A new word: never one of the world's; ``reserve`` adds it to them."""
        while True:
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                        for _ in range(syllables)).capitalize()
            if w not in self._used and len(w) >= 4:
                if reserve:
                    self._used.add(w)
                return w

    @cached_property
    def vocabulary(self) -> dict[str, list[str]]:
        """The words a capital, a language or a currency can be: ``vocabulary`` of each.

        Kingdoms are new, their values are not: like real capitals and currencies, a value is
        a word the model has met in pretraining (every one of them is some seen kingdom's,
        so the tokenizer learns it as one token). Reading a passage then copies a known
        word, as it copies a year; an invented word split in pieces was never copied by a
        model of this size within its budget (README: retrieval). A value alone still says
        nothing about which kingdom holds it: closed book on an unseen kingdom guesses among
        ``vocabulary`` words.
        """
        if not self.config.vocabulary:
            return {}
        rng = random.Random(f"facts:{self.config.seed}:vocabulary")
        # at most one word per seen kingdom, so that every word is some seen kingdom's
        n = min(self.config.vocabulary, round(self.config.n_entities * self.config.seen_fraction))
        return {a: [self._value(rng, a, True) for _ in range(n)] for a in _WORDS}

    def _value(self, rng: random.Random, attribute: str, reserve: bool) -> str:
        """A new word shaped like a capital, a language or a currency."""
        if attribute == "capital":
            return self._word(rng, 2, reserve)
        if attribute == "language":
            return self._word(rng, 2, reserve) + rng.choice(("ic", "ish", "ese", "an"))
        return self._word(rng, 1, reserve).lower() + rng.choice(("a", "o", "el", "ar"))

    def _entity(self, rng: random.Random, id: str, seen: bool, reserve: bool = True,
                values: dict[str, str] | None = None) -> Entity:
        if not self.vocabulary:
            return self._invented(rng, id, seen, reserve)
        values = values or {a: rng.choice(words) for a, words in self.vocabulary.items()}
        return Entity(
            id=id,
            name=self._word(rng, rng.choice((2, 3)), reserve),
            founded=str(rng.randint(300, 1899)),
            seen=seen,
            **values,
        )

    def _invented(self, rng: random.Random, id: str, seen: bool, reserve: bool) -> Entity:
        name = self._word(rng, rng.choice((2, 3)), reserve)
        values = {a: self._value(rng, a, reserve) for a in _WORDS}
        return Entity(id=id, name=name, founded=str(rng.randint(300, 1899)), seen=seen, **values)

    def practice(self, rng: random.Random) -> Entity:
        """A fresh kingdom outside the world, for teaching reading from passages.

        Its name is never a world kingdom's and its id lies past the world's, so no practice
        fact can leak a test answer: its values are vocabulary words like everyone's, but a
        fact is a kingdom's value, and practice kingdoms are only ever read, never
        remembered.
        """
        self.entities  # noqa: B018 - the world's words are reserved first
        n = self.config.n_entities
        return self._entity(rng, f"kb-{n + rng.randrange(max(100, 1000 - n))}", seen=False, reserve=False)

    def entity(self, passage_id: str) -> Entity:
        return self.entities[int(passage_id.removeprefix("kb-"))]

    def passage(self, entity: Entity, rng: random.Random | None = None) -> str:
        """The kingdom's encyclopedia passage: its canonical wording (each fact naming the
        kingdom, :meth:`statement`), or with ``rng`` a fresh one (the order of the facts
        drawn anew, a third of them in other wordings)."""
        attributes = list(ATTRIBUTES)
        if rng is not None:
            rng.shuffle(attributes)
        parts = [f"{entity.name} is a kingdom."]
        for attribute in attributes:
            fact = {"e": entity.name, "v": entity.value(attribute)}
            if rng is not None and rng.random() < 1 / 3:
                parts.append(rng.choice(_SENTENCES[attribute]).format(**fact))
            else:
                parts.append(self.statement(entity, attribute) + ".")
        return " ".join(parts)

    def statement(self, entity: Entity, attribute: str) -> str:
        """One fact in the canonical wording, naming the kingdom (no final period)."""
        return _STATEMENT[attribute].format(e=entity.name, v=entity.value(attribute))

    def claim(self, entity: Entity, attribute: str) -> str:
        """One fact as an answer states it, without the kingdom's name (no final period)."""
        return _CLAIM[attribute].format(v=entity.value(attribute))

    def passages(self, seen: bool | None = None) -> list[tuple[str, str]]:
        """(id, text) of every passage, or only the seen / unseen ones."""
        return [(e.id, self.passage(e)) for e in self.entities if seen is None or e.seen == seen]

    # -- questions ---------------------------------------------------------------------
    def question(self, entity: Entity, attribute: str, split: str = "practice") -> Sample:
        """The question about one fact of any kingdom (world or practice)."""
        return self._sample(entity, attribute, split)

    def _sample(self, entity: Entity, attribute: str, split: str) -> Sample:
        value = entity.value(attribute)
        return Sample(
            id=f"facts-{entity.id}-{attribute}",
            question=ATTRIBUTES[attribute].format(e=entity.name),
            answer=value,
            solution=f"#### {self.claim(entity, attribute)}.",
            metadata={"entity": entity.id, "name": entity.name, "attribute": attribute,
                      "seen": entity.seen, "split": split},
        )

    @cached_property
    def _splits(self) -> dict[str, list[Sample]]:
        rng = random.Random(f"facts:{self.config.seed}:splits")
        out: dict[str, list[Sample]] = {"train": [], "validation": [], "test": []}
        for entity in self.entities:
            for attribute in ATTRIBUTES:
                if not entity.seen:
                    out["test"].append(self._sample(entity, attribute, "test"))
                    continue
                r = rng.random()
                split = "test" if r < self.config.test_fraction else (
                    "validation" if r < self.config.test_fraction * 1.4 else "train")
                out[split].append(self._sample(entity, attribute, split))
        for samples in out.values():  # interleave seen and unseen deterministically
            random.Random(f"facts:{self.config.seed}:order").shuffle(samples)
        return out

    def split(self, split: Split, n: int | None = None) -> list[Sample]:
        return self._splits[check_split(split)][:n]

    def answer_with_citation(self, sample: Sample) -> str:
        """The ideal open-book answer: the closed-book one, citing its passage."""
        return f"{sample.solution.removesuffix('.')} [{sample.metadata['entity']}]."

    def wordings(self, sample: Sample) -> set[str]:
        """How an answer may open before the asked value (normalised): the answers' own
        wording, the passages' canonical one and their others; "" for the bare value."""
        attribute, name = sample.metadata["attribute"], sample.metadata["name"]
        phrasings = [_CLAIM[attribute], _STATEMENT[attribute], *_SENTENCES[attribute]]
        return {""} | {normalize(p.format(e=name, v="").rstrip(". ")) for p in phrasings}

    def score(self, sample: Sample, text: str) -> Score:
        """Right when the final line states the asked value, bare or in a wording of the
        asked attribute: "#### Its capital is Taike." answers a currency question wrong."""
        stated = _final_statement(text)
        if stated is None:
            return Score(0.0, False, None)
        opening, value = stated
        correct = (normalize(value) == normalize(sample.answer)
                   and normalize(opening) in self.wordings(sample))
        return Score(1.0 if correct else 0.0, correct, value)
