from __future__ import annotations

import random

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from assist import CHAT_TEMPLATE, render, render_segments
from assist.prompts import CALCULATOR_TOOL, REFLECT_AGAIN, REFLECT_DIFFER, REFLECT_STANDS
from evals.tasks import ArithTask, FactsTask
from evals.tasks.facts import fact_answer
from strategies.reflect import revision
from training import conversations
from training._model import IGNORE, encode_chat
from training.tokenizer import train_tokenizer

TEMPLATE = _compile_jinja_template(CHAT_TEMPLATE)
MIXTURE = dict.fromkeys(conversations.KINDS, 1.0)


def _convs(n: int = 60) -> list[dict]:
    return list(conversations.stream(MIXTURE, ArithTask(), FactsTask(), n, seed="chat-test"))


@pytest.fixture(scope="module")
def tokenizer():
    texts = [render(c["messages"], c["tools"]) for c in _convs(400)]
    return train_tokenizer(texts, 600)


def test_python_rendering_equals_the_jinja_template():
    cases = [(c["messages"], c["tools"]) for c in _convs()]
    cases.append(([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                  [CALCULATOR_TOOL]))
    cases.append(([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}], None))
    for messages, tools in cases:
        for agp in (False, True):
            assert render(messages, tools, agp) == TEMPLATE.render(
                messages=messages, tools=tools, add_generation_prompt=agp)


def test_tokenizer_has_chat_specials_and_splits_digits(tokenizer):
    vocab = tokenizer.get_vocab()
    for special in ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<|reward|>", "<|pad|>"):
        assert special in vocab
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("12+345", add_special_tokens=False))
    assert pieces == ["1", "2", "+", "3", "4", "5"]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_sft_labels_cover_assistant_text_and_its_end_of_turn(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for conv in _convs(30):
        ids, labels = encode_chat(tokenizer, conv["messages"], conv["tools"], 4096)
        assert ids == tokenizer.encode(render(conv["messages"], conv["tools"]), add_special_tokens=False)
        learned = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
        expected = "".join(text for text, is_asst in render_segments(conv["messages"], conv["tools"]) if is_asst)
        assert learned == expected
        n_turns = sum(m["role"] == "assistant" and m.get("train", True) for m in conv["messages"])
        assert sum(1 for t, lab in zip(ids, labels) if lab == im_end) == n_turns
        assert labels[0] == IGNORE  # the user's words are never a target


def test_reflection_checks_by_solving_again_in_another_order():
    rng = random.Random(1)
    task = ArithTask()
    for sample in task.split("train", 20):
        for _ in range(6):
            messages = conversations.arith_reflect(sample, rng)["messages"]
            attempt, check = messages[1], messages[3]["content"]
            again = check.split("\n", 1)[1]
            assert check.startswith(REFLECT_AGAIN)
            # the re-solve starts with another step than the attempt, and is right
            assert again.splitlines()[1] != attempt["content"].splitlines()[1]
            assert task.score(sample, again.split(REFLECT_STANDS)[0].split(REFLECT_DIFFER)[0]).correct
            slipped = not task.score(sample, attempt["content"]).correct
            assert attempt.get("train", True) is not slipped  # a slip is context, never a target
            if slipped:
                corrected = check.split(REFLECT_DIFFER, 1)[1]
                assert task.score(sample, corrected).correct
                assert revision(check) == corrected.strip()
            else:
                assert REFLECT_STANDS in check and revision(check) is None


def test_tool_conversations_write_each_expression_before_calling_on_it():
    # The call copies the expression the text just wrote, as cot writes it: the amount
    # is found where cot finds it, not from inside the call's JSON.
    task = ArithTask()
    rng = random.Random(4)
    for sample in task.split("train", 20):
        messages = conversations.arith_tools(sample, rng)["messages"]
        calls = [m for m in messages if m.get("tool_calls")]
        results = [m["content"] for m in messages if m["role"] == "tool"]
        assert len(calls) == len(sample.metadata["changes"]) == len(results)
        value = sample.metadata["start"]
        for i, (call, result) in enumerate(zip(calls, results)):
            expression = call["tool_calls"][0]["function"]["arguments"]["expression"]
            sentence, _, written = call["content"].rpartition(": ")
            assert written.strip() == expression
            assert sentence.rsplit("\n", 1)[-1] + "." == sample.metadata["sentences"][i + 1]
            assert expression.startswith(str(value))  # the running amount, then the change
            value = int(result)
        assert messages[-1]["content"] == f"#### {sample.answer}" and value == int(sample.answer)


def test_rag_conversations_read_practice_kingdoms_only():
    facts = FactsTask()
    world = {e.name for e in facts.entities}
    rng = random.Random(2)
    for _ in range(50):
        conv = conversations.build("facts_rag", None, rng, facts)
        turn, answer = conv["messages"]
        question, passages = turn["content"].split("\n\n", 1)
        value = fact_answer(answer["content"])
        assert value and f" {value}." in passages  # readable from the passage after the question
        assert question.startswith(("What", "In what")) and question.endswith("?")
        assert not any(name in turn["content"] for name in world)


def test_render_rejects_empty_conversation():
    with pytest.raises(ValueError):
        render([])
