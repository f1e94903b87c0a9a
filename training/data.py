"""Stage 0a: the pretraining mixture, sampled by fixed ratios and tokenized.

Five sources, as in the talk's "data mixture" slide, at miniature scale:

- ``arith``: generated word problems with their worked solutions (train split only), the
  changes applied in a random order (a question before its solution makes the solution's
  numbers predictable only by copying them: bare computations, tried as "drills", took
  that pressure away and multi-digit copying did not emerge),
- ``facts``: encyclopedia passages of the *seen* part of the fictional world, repeated so a
  small model can memorise them, each time worded afresh (knowledge a model can later
  be asked about, rather than one string it can only recite),
- ``dialogue``: chat-formatted conversations (the SFT kinds, from other seeds),
- ``code``: real text available offline, Python's own standard-library source,
- ``copy``: spans of problem text repeated twice, which teaches copying from context.

Each document's source is drawn at random with weights ``ratio / mean document length``, so
the *token* shares come out near the configured ratios; the realized shares are recorded.
"""

from __future__ import annotations

import itertools
import random
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assist.chat_format import render
from evals.tasks import ArithTask, FactsTask
from evals.tasks.arith import random_solution
from evals.tasks.facts import ATTRIBUTES, Entity
from training import conversations

__all__ = ["MixtureResult", "SOURCES", "build_stream", "documents", "sources"]


def _arith(arith: ArithTask, seed: int) -> Iterator[str]:
    # Its own stream of train problems: never a validation or test question.
    rng = random.Random(f"pretrain-arith:{seed}")
    for s in arith.iter_train(f"pretrain-{seed}"):
        solution = random_solution(s, rng)
        yield f"{s.question}\n{solution}" if rng.random() < 0.8 else solution


def _restated(facts: FactsTask, entity: Entity, rng: random.Random) -> str:
    """A kingdom's passage (worded afresh), then some of its facts stated again, each as an
    answer states it."""
    claims = [f"{facts.claim(entity, a)}." for a in ATTRIBUTES]
    rng.shuffle(claims)
    return f"{facts.passage(entity, rng)}\n" + " ".join(claims[: rng.randint(1, len(claims))])


def _fact_lookup(facts: FactsTask, rng: random.Random) -> str:
    """A practice kingdom's passage, then its facts restated: values copied out of context,
    the reading that retrieval needs (never a world kingdom, so memory cannot answer)."""
    return _restated(facts, facts.practice(rng), rng)


def _copy(arith: ArithTask, seed: int, facts: FactsTask | None = None, lookups: float = 0.2) -> Iterator[str]:
    """Text, then the same text again: the plainest lesson in copying from context.

    A small model reads the operands of a word problem back out of the question by
    induction ("what followed this the last time?"). Repeated spans teach that mechanism
    far sooner than the problems alone do. Half the documents repeat problem sentences in
    a shuffled order; the other half are keyed lookups ("Then 47. First 802. ..." then the
    keys again in another order, each followed by its number). Their numbers are random,
    so nothing but copying predicts them, and a number is found by the phrase before it,
    digit after digit: exactly how a solution restates an operand. With ``facts``, a share
    ``lookups`` of the documents are a practice kingdom's passage followed by its facts
    restated: the reading retrieval needs. Without these lessons, whether multi-digit
    copying emerged within the CPU budget was a coin flip.
    """
    rng = random.Random(f"pretrain-copy:{seed}")
    for s in arith.iter_train(f"copy-{seed}"):
        if facts is not None and rng.random() < lookups:
            yield _fact_lookup(facts, rng)
            continue
        if rng.random() < 0.5:
            sentences = list(s.metadata["sentences"])
            rng.shuffle(sentences)
            span = " ".join(sentences[: rng.randint(2, len(sentences))])
            yield f"{span}\n{span}"
            continue
        keys = rng.sample(_COPY_KEYS, rng.randint(2, 5))
        values = {k: str(rng.randint(1, 10 ** rng.randint(1, 3) - 1)) for k in keys}
        first = " ".join(f"{k} {values[k]}." for k in keys)
        rng.shuffle(keys)
        yield f"{first}\n" + " ".join(f"{k} {values[k]}." for k in keys)


_COPY_KEYS = ("First", "Then", "Next", "After that", "Later", "Finally", "Mia has", "Leo buys",
              "Ava sells", "Sam finds", "Zoe gives away", "Max loses", "Ivy wins", "Ben uses",
              "Eli drops", "Ana picks up", "It was founded in", "The year is", "The total is")


def _facts(facts: FactsTask, seed: int, restate: float = 0.0) -> Iterator[str]:
    """The seen world's passages; a share ``restate`` of them followed by some of their facts
    again, where copying from the passage and recalling agree."""
    seen = [e for e in facts.entities if e.seen]
    rng = random.Random(f"pretrain-facts:{seed}")
    while True:
        rng.shuffle(seen)
        for entity in seen:
            restated = restate > 0 and rng.random() < restate  # no draw at 0: streams unchanged
            yield _restated(facts, entity, rng) if restated else facts.passage(entity, rng)


def _dialogue(mixture: dict[str, float], arith: ArithTask, facts: FactsTask, seed: int) -> Iterator[str]:
    for block in itertools.count():
        for conv in conversations.stream(mixture, arith, facts, 1000, f"dialogue:{seed}:{block}"):
            yield render(conv["messages"], conv["tools"])


def _code(seed: int, chunk_chars: int = 1200) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    files += sorted(p for p in root.glob("[a-z]*/*.py") if "test" not in p.parts[-2])
    random.Random(f"pretrain-code:{seed}").shuffle(files)
    chunks: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines, buf = text.splitlines(keepends=True), ""
        for line in lines:
            buf += line
            if len(buf) >= chunk_chars:
                chunks.append(buf)
                buf = ""
        if buf.strip():
            chunks.append(buf)
    if not chunks:
        raise RuntimeError(f"no Python source found under {root} for the code source")
    while True:  # cycled only if the stream outgrows the standard library
        yield from chunks


SOURCES = ("arith", "facts", "dialogue", "code", "copy")


def sources(
    arith: ArithTask, facts: FactsTask, sft_mixture: dict[str, float], seed: int,
    lookups: float = 0.2, restate: float = 0.0,
) -> dict[str, Iterator[str]]:
    return {
        "arith": _arith(arith, seed),
        "facts": _facts(facts, seed, restate),
        "dialogue": _dialogue(sft_mixture, arith, facts, seed),
        "code": _code(seed),
        "copy": _copy(arith, seed, facts, lookups),
    }


def documents(
    ratios: dict[str, float], streams: dict[str, Iterator[str]], seed: int,
    length: Callable[[str], int] = len,
) -> Iterator[tuple[str, str]]:
    """(source, document) pairs drawn so each source's share of ``length`` tracks its ratio."""
    unknown = set(ratios) - set(streams)
    if unknown or not any(v > 0 for v in ratios.values()):
        raise ValueError(f"mixture needs positive ratios over {', '.join(SOURCES)}; got {ratios}")
    names = [k for k, v in ratios.items() if v > 0]
    peeked: dict[str, list[str]] = {k: [next(streams[k]) for _ in range(50)] for k in names}
    mean_len = {k: max(1.0, sum(map(length, v)) / len(v)) for k, v in peeked.items()}
    weights = [ratios[k] / mean_len[k] for k in names]
    rng = random.Random(f"mixture:{seed}")
    while True:
        name = rng.choices(names, weights)[0]
        yield name, (peeked[name].pop() if peeked[name] else next(streams[name]))


@dataclass
class MixtureResult:
    tokens: int
    documents: int
    ratios: dict[str, float]  # configured
    realized: dict[str, float]  # share of tokens actually drawn from each source


def build_stream(
    docs: Iterator[tuple[str, str]], encode: Callable[[str], list[int]], eot_id: int,
    n_tokens: int, path: Path, ratios: dict[str, float],
) -> MixtureResult:
    """Tokenize documents into one ``uint16`` stream of at least ``n_tokens`` tokens."""
    counts: dict[str, int] = dict.fromkeys(ratios, 0)
    parts: list[np.ndarray] = []
    total = n_docs = 0
    while total < n_tokens:
        source, text = next(docs)
        ids = encode(text) + [eot_id]
        parts.append(np.asarray(ids, dtype=np.uint16))
        counts[source] += len(ids)
        total += len(ids)
        n_docs += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.concatenate(parts))
    tmp.replace(path)
    realized = {k: round(v / total, 4) for k, v in counts.items()}
    return MixtureResult(total, n_docs, dict(ratios), realized)

