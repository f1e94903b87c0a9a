from __future__ import annotations

import json
import random
import re

import pytest

from evals.tasks import (
    ArithConfig,
    ArithTask,
    FactsConfig,
    FactsTask,
    JsonlError,
    JsonlTask,
    get_task,
    gsm8k_flexible,
    gsm8k_strict,
    gsm8k_task,
    normalize,
)
from evals.tasks.arith import orders, solution_in_order
from evals.tasks.facts import fact_answer
from strategies.extract import final_line


def test_arith_is_deterministic_and_splits_are_disjoint():
    a, b = ArithTask(), ArithTask()
    assert [s.question for s in a.split("test", 50)] == [s.question for s in b.split("test", 50)]
    test = {s.question for s in a.split("test")}
    validation = {s.question for s in a.split("validation")}
    train = {s.question for s in a.split("train", 5000)}
    assert len(test) == 1000 and len(validation) == 500
    assert not test & validation and not test & train and not validation & train
    assert not {s.question for s in a.train_stream("rl", 3000)} & test


def test_arith_solutions_follow_gsm8k_format_and_score_correct():
    task = ArithTask()
    for sample in task.split("test", 200):
        lines = sample.solution.splitlines()
        assert lines[-1] == f"#### {sample.answer}"
        assert sample.question.startswith(lines[0])  # the start restated
        steps = lines[1:-1]
        assert len(steps) == 3
        for line in steps:
            sentence, _, calc = line.partition(": ")
            assert sentence in sample.question  # each step restates its sentence
            expr, _, rest = calc.partition("=<<")
            assert rest.startswith(expr + "=")
        score = task.score(sample, sample.solution)
        assert score.correct and score.value == 1.0
        assert 0 <= int(sample.answer) <= 999
        assert all(11 <= b <= 59 for _, b in sample.metadata["changes"])  # multi-digit operands


def test_arith_changes_commute_and_every_order_is_a_right_solution():
    task = ArithTask()
    for sample in task.split("test", 100):
        all_orders = orders(sample)
        assert len(all_orders) == 6
        texts = {solution_in_order(sample, o) for o in all_orders}
        assert len(texts) == len(set(map(tuple, all_orders)))  # each order writes other numbers
        for text in texts:
            assert task.score(sample, text).correct
            values = [int(v) for v in re.findall(r">>(\d+)", text)]
            assert all(0 <= v <= 999 for v in values)  # no order leaves the range
        first_lines = {solution_in_order(sample, o).splitlines()[1] for o in all_orders}
        assert len(first_lines) == 3  # three different first steps


def test_arith_with_multiplication_keeps_the_question_order():
    task = ArithTask(ArithConfig(min_operand=1, max_operand=20, max_value=100, ops=("+", "-", "*")))
    for sample in task.split("test", 50):
        assert orders(sample) == [(0, 1, 2)]
        assert solution_in_order(sample, (0, 1, 2)) == sample.solution


def test_arith_partial_credit_ranks_wrong_answers_below_correct():
    task = ArithTask()
    sample = task.split("test", 1)[0]
    good_steps_bad_answer = sample.solution.rsplit("#### ", 1)[0] + f"#### {int(sample.answer) + 1}"
    assert task.score(sample, "nonsense").value == 0.0
    partial = task.score(sample, good_steps_bad_answer)
    assert not partial.correct and 0.2 < partial.value < 1.0
    assert task.score(sample, "1+1=<<1+1=3>>3\n#### 3").value < partial.value


def test_arith_knobs_make_harder_problems():
    hard = ArithTask(ArithConfig(min_steps=4, max_steps=4, min_operand=1, max_operand=20, max_value=100,
                                 ops=("+", "-", "*")))
    samples = hard.split("test", 100)
    assert all(len(s.metadata["steps"]) == 4 for s in samples)
    assert any(op == "*" for s in samples for _, op, _ in s.metadata["steps"])
    assert max(int(s.answer) for s in samples) > 30
    easy = ArithTask(ArithConfig(min_steps=2, max_steps=2, min_operand=1, max_operand=9, max_value=30))
    assert all(int(s.answer) <= 30 and len(s.metadata["steps"]) == 2 for s in easy.split("test", 100))
    with pytest.raises(ValueError, match="min_steps"):
        ArithConfig(min_steps=3, max_steps=2)


def test_facts_world_seen_unseen_and_splits():
    task = FactsTask()
    assert len(task.entities) >= 100
    assert len({e.name for e in task.entities}) == len(task.entities)
    seen = {e.id for e in task.entities if e.seen}
    assert 0 < len(seen) < len(task.entities)
    train, test = task.split("train"), task.split("test")
    assert all(s.metadata["entity"] in seen for s in train)
    assert {s.id for s in train}.isdisjoint({s.id for s in test})
    assert any(not s.metadata["seen"] for s in test) and any(s.metadata["seen"] for s in test)
    # Every answer is in its entity's passage, and the ideal answer scores correct.
    for s in test[:100]:
        entity = task.entity(s.metadata["entity"])
        assert s.answer in task.passage(entity)
        assert task.score(s, task.answer_with_citation(s)).correct
        # the passage names the kingdom in each fact; the answer states the value without
        # restating the invented name (the copy a small model got wrong)
        assert f"{task.statement(entity, s.metadata['attribute'])}." in task.passage(entity)
        assert entity.name in task.statement(entity, s.metadata["attribute"])
        assert entity.name not in s.solution and entity.name not in task.answer_with_citation(s)
        claim = task.claim(entity, s.metadata["attribute"])
        assert s.solution == f"#### {claim}." and claim.endswith(f" {s.answer}")


def test_facts_scores_the_value_its_final_line_states_in_a_wording_of_the_asked_attribute():
    # The final line states the fact once ("#### Its capital is Taike."): a small model wrote
    # the sentence right and then failed to copy the word down to a "#### Taike" line.
    task = FactsTask(FactsConfig(n_entities=60, vocabulary=12))
    s = next(s for s in task.split("test") if s.metadata["attribute"] == "capital")
    entity, v = task.entity(s.metadata["entity"]), s.answer
    other = next(w for w in task.vocabulary["capital"] if w != v)
    right = [s.solution, task.answer_with_citation(s), f"#### {v}", f"#### {v}.",
             f"Its capital is {v}.\n#### {v}",  # the arith-like convention still reads
             f"#### The capital of {entity.name} is {v}.", f"#### The capital city is {v} [kb-3]."]
    wrong = [f"#### Its capital is {other}.", f"#### Its currency is the {v}.",  # another attribute
             f"#### not {v}", f"Its capital is {v}.", "####", f"Its capital is {v}.\n#### {other}"]
    for text in right:
        assert task.score(s, text).correct, text
        assert task.score(s, text).extracted == v
    for text in wrong:
        assert not task.score(s, text).correct, text
    assert fact_answer(f"#### Its capital is {other} [kb-9].") == other
    assert fact_answer("no final line") is None and task.score(s, "").extracted is None


def test_facts_values_come_from_a_vocabulary_every_word_of_which_is_pretrained():
    task = FactsTask(FactsConfig(n_entities=60, vocabulary=12))
    seen = [e for e in task.entities if e.seen]
    for attribute, words in task.vocabulary.items():
        assert len(words) == len(set(words)) == 12
        # each word is some seen kingdom's (so pretraining states it), none is a kingdom's name
        assert {e.value(attribute) for e in seen} == set(words)
        assert all(e.value(attribute) in words for e in task.entities)
        assert not set(words) & {e.name for e in task.entities}
    # an unseen kingdom's values are not its passage id's or a seen twin's: the draw is free
    unseen = [e for e in task.entities if not e.seen]
    assert len({(e.capital, e.language, e.currency) for e in unseen}) == len(unseen)
    with pytest.raises(ValueError, match="vocabulary"):
        FactsConfig(vocabulary=1)
    assert FactsTask().vocabulary == {}  # the default: every value a new word


def test_facts_seen_test_split_is_large_enough_for_claims():
    test = FactsTask().split("test")
    assert len(test) >= 200
    assert sum(s.metadata["seen"] for s in test) >= 60 and sum(not s.metadata["seen"] for s in test) >= 200


def test_facts_practice_kingdoms_never_touch_the_world():
    task = FactsTask()
    world_words = {getattr(e, a) for e in task.entities for a in ("name", "capital", "language", "currency")}
    world_ids = {e.id for e in task.entities}
    rng = random.Random(0)
    practice = [task.practice(rng) for _ in range(2000)]
    for e in practice:
        assert e.id not in world_ids and not e.seen
        assert not {e.name, e.capital, e.language, e.currency} & world_words
    # with a vocabulary, practice values are its words; names stay the practice kingdom's own
    worded = FactsTask(FactsConfig(vocabulary=24))
    names = {e.name for e in worded.entities}
    for e in (worded.practice(rng) for _ in range(500)):
        assert e.id not in world_ids and e.name not in names
        assert all(e.value(a) in words for a, words in worded.vocabulary.items())
    # a fresh wording still states every fact, and differs between draws
    entity = task.entities[0]
    wordings = {task.passage(entity, rng) for _ in range(20)}
    assert len(wordings) > 1
    for text in wordings:
        assert all(entity.value(a) in text for a in ("capital", "language", "currency", "founded"))
    assert task.passage(entity) == task.passage(entity)  # the canonical wording is stable


def test_extractors_follow_lm_eval_normalisation():
    assert gsm8k_strict("so #### 1,000.") == "1000"
    assert gsm8k_strict("#### -7") == "-7"
    assert gsm8k_strict("the answer is 5") is None
    assert gsm8k_flexible("I paid $1,200 then 3.5.") == "3.5"
    assert gsm8k_flexible("no numbers") is None
    assert final_line("x\n#### Tarsk \n") == "Tarsk"
    assert normalize("7.0") == "7" and normalize(" The Drulo. ") == "the drulo"


def test_gsm8k_loader_reads_real_files(gsm8k_dir):
    task = gsm8k_task(gsm8k_dir)
    test = task.split("test")
    assert len(test) == 1319
    first = test[0]
    assert first.answer == "18" and "####" in first.solution
    assert task.score(first, first.solution).correct
    assert len(task.split("train", 10)) == 10


def test_scoring_agrees_with_gsm8k_correctness_labels(gsm8k_dir):
    """OpenAI's GPT-3 sample solutions carry correctness labels; our flexible scorer agrees."""
    rows = [json.loads(line) for line in (gsm8k_dir / "example_model_solutions.jsonl").open()]
    agree = total = 0
    for row in rows:
        gold = gsm8k_strict(row["ground_truth"].replace("A: ", "#### ")) or ""
        for value in row.values():
            if isinstance(value, dict) and "is_correct" in value:
                predicted = gsm8k_flexible(value["solution"])
                agree += (predicted is not None and normalize(predicted) == normalize(gold)) == value["is_correct"]
                total += 1
    assert total > 1000
    assert agree / total > 0.99


def test_jsonl_task_reports_bad_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\nnot json\n{"question": "x"}\n')
    with pytest.raises(JsonlError, match=r"t.jsonl:2"):
        JsonlTask("t", {"test": path}).split("test")
    task = JsonlTask("t", {"test": path}, skip_bad=True)
    assert [s.answer for s in task.split("test")] == ["2"]
    assert len(task.problems) == 2 and "t.jsonl:3" in task.problems[1]
    with pytest.raises(JsonlError, match="cannot read"):
        JsonlTask("t", {"test": tmp_path / "missing.jsonl"}).split("test")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
