"""The base model's number probe (training/probes.py): which numbers count as which kind,
and that a model is scored right exactly when its top token is right at every digit."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from evals.tasks import ArithTask, FactsTask
from evals.tasks.arith import random_solution
from training.config import preset
from training.probes import KINDS, facts_probe, number_kinds, number_probe
from training.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def arith_and_tok():
    arith = ArithTask(preset("tiny").arith)
    rng = random.Random(0)
    texts = [f"{s.question}\n{random_solution(s, rng)}" for s in arith.split("validation", 200)]
    return arith, train_tokenizer(texts, 400)


def test_each_number_of_a_solution_gets_its_kind():
    text = ["Max", " has", " ", "4", "4", "6", ".", " next", " uses", " ", "4", "5", ".", "\n",  # question
            "Max", " has", " ", "4", "4", "6", ".", "\n", "Max", " next", " uses", " ", "4", "5", ":", " ",
            "4", "4", "6", "-", "4", "5", "=", "4", "0", "1", "\n", "#", " ", "4", "0", "1"]
    spans = number_kinds(text, 14, {"446", "45"})
    numbers = [("".join(text[a:b]), kind) for a, b, kind in spans]
    assert numbers == [("446", "context_copy"),  # the start, restated at once
                       ("45", "operand_copy"),  # found in the question by the phrase before it
                       ("446", "context_copy"), ("45", "context_copy"),  # repeated in its own line
                       ("401", "arithmetic"), ("401", "context_copy")]


class _Oracle(torch.nn.Module):
    """Predicts the next token of its input exactly (it peeks), or one token everywhere."""

    def __init__(self, vocab: int, constant: int | None = None) -> None:
        super().__init__()
        self.vocab, self.constant = vocab, constant
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        nxt = torch.roll(input_ids, -1, dims=1) if self.constant is None else torch.full_like(input_ids, self.constant)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_a_perfect_reader_scores_every_kind_and_a_blind_one_none(arith_and_tok):
    arith, tok = arith_and_tok
    samples = arith.split("test", 12)
    perfect = number_probe(_Oracle(len(tok)), tok, samples)
    assert perfect["problems"] == 12
    assert all(perfect[k] == 1.0 and perfect[f"{k}_n"] > 0 for k in KINDS)
    # 3 changes per problem: each operand is copied out of the question once (fewer only when
    # an operand equals an amount already written)
    assert 30 <= perfect["operand_copy_n"] <= 36
    blind = number_probe(_Oracle(len(tok), constant=tok.convert_tokens_to_ids("7")), tok, samples)
    assert all(blind[k] < 0.5 for k in KINDS)


@pytest.fixture(scope="module")
def facts_and_tok():
    facts = FactsTask()
    texts = [facts.passage(e, random.Random(i)) for i, e in enumerate(facts.entities)]
    return facts, train_tokenizer(texts, 500)


def test_facts_probe_scores_recall_and_reading_by_whole_values(facts_and_tok):
    facts, tok = facts_and_tok
    perfect = facts_probe(_Oracle(len(tok)), tok, facts, n=5)
    assert perfect == {"recall": 1.0, "read": 1.0, "recall_n": 20, "read_n": 20}
    # a model that only ever says one token is right on no value (values are several tokens)
    blind = facts_probe(_Oracle(len(tok), constant=tok.convert_tokens_to_ids("1")), tok, facts, n=5)
    assert blind["recall"] == 0.0 and blind["read"] == 0.0


class _Copier(torch.nn.Module):
    """Right only where the next token already appeared in the context: reads, recalls nothing."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        ids = input_ids[0].tolist()
        nxt = [ids[i + 1] if i + 1 < len(ids) and ids[i + 1] in ids[: i + 1] else 0 for i in range(len(ids))]
        return SimpleNamespace(logits=torch.nn.functional.one_hot(torch.tensor([nxt]), self.vocab).float())


def test_facts_probe_tells_reading_from_recall(facts_and_tok):
    facts, tok = facts_and_tok
    copier = facts_probe(_Copier(len(tok)), tok, facts, n=5)
    assert copier["read"] == 1.0  # every value is in the passage before it
    assert copier["recall"] < 0.5  # with nothing in context, only a repeated token is right
