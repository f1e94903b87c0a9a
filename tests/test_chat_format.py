from __future__ import annotations

import random

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from assist import CHAT_TEMPLATE, render, render_segments
from assist._prompts import CALCULATOR_TOOL
from evals.tasks import ArithTask, FactsTask
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
        n_turns = sum(m["role"] == "assistant" for m in conv["messages"])
        assert sum(1 for t, lab in zip(ids, labels) if lab == im_end) == n_turns
        assert labels[0] == IGNORE  # the user's words are never a target


def test_reflection_turns_correct_slips():
    rng = random.Random(1)
    sample = ArithTask().split("train", 1)[0]
    texts = [conversations.arith_reflect(sample, rng)["messages"][3]["content"] for _ in range(40)]
    assert any("wrong" in t and t.endswith(f"#### {sample.answer}") for t in texts)
    assert any("The answer stands." in t for t in texts)
    assert all(t.endswith(f"#### {sample.answer}") for t in texts if "wrong" in t)


def test_render_rejects_empty_conversation():
    with pytest.raises(ValueError):
        render([])
