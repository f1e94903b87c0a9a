"""The torch engine's serving surface: enforced JSON and tool calls, streaming, legacy
completions with prompt logprobs, argument checks and cancellation.

All but the pure-Python gate tests run on the session's trained `test` checkpoint; the
engine is built once for the module.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import xgrammar as xgr

from assist.chat_format import parse_tool_calls, tool_call_text
from assist.engine import EngineOverloaded, TorchEngine
from assist.engine._grammar import parse_calls
from assist.engine._stream import _Gate
from assist.errors import BadRequest, ContextLengthExceeded, Overloaded

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "integer", "minimum": 0, "maximum": 999},
        "unit": {"type": "string", "enum": ["cups", "apples", "none"]},
    },
    "required": ["answer", "unit"],
    "additionalProperties": False,
}
RF = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "required": ["a", "b"],
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                       "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}},
    {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "required": ["city", "unit"],
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"type": "string", "enum": ["c", "f"]}}}}},
]
PROMPTS = ["What is 2+3?", "Mia has 3 cups and buys 4 more.", "Hello there"]
LONG = {"type": "json_schema", "json_schema": {"name": "long", "schema": {"type": "string", "minLength": 5000}}}


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _valid(obj: Any) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"answer", "unit"} and type(obj["answer"]) is int
            and 0 <= obj["answer"] <= 999 and obj["unit"] in ("cups", "apples", "none"))


async def _until(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


@pytest.fixture(scope="module")
def engine(trained_run):
    out, _ = trained_run
    eng = TorchEngine(out / "rlhf", max_batch=8)
    yield eng
    eng.close()


def run(coro):
    return asyncio.run(coro)


# -- constrained output ---------------------------------------------------------------------------
def test_json_schema_outputs_parse_and_validate_greedy_and_sampled(engine):
    for prompt in PROMPTS:
        out = run(engine.chat(_user(prompt), response_format=RF, max_tokens=40))
        assert out.choices[0].finish_reason == "stop", out.text
        assert _valid(json.loads(out.text)), out.text
    sampled = run(engine.chat(_user(PROMPTS[1]), response_format=RF, max_tokens=40, n=4, temperature=1.0, seed=7))
    assert len(sampled.choices) == 4
    for choice in sampled.choices:
        assert choice.finish_reason == "stop" and _valid(json.loads(choice.message.content))


def test_json_object_only_ends_on_a_complete_object(engine):
    grammar = engine.grammars.response_format({"type": "json_object"})
    eos = engine.eos_ids[0]
    matcher = grammar.new()
    for token in engine.tokenize('{"a": [1, "x"]'):
        logits = torch.zeros(engine.vocab_size)
        matcher.mask_(logits)
        assert logits[token] == 0 and logits[eos] == float("-inf")  # no stop mid-object
        assert matcher.accept(token)
    logits = torch.zeros(engine.vocab_size)
    matcher.mask_(logits)
    assert logits[eos] == float("-inf")
    assert matcher.accept(engine.tokenize("}")[0])
    logits = torch.zeros(engine.vocab_size)
    matcher.mask_(logits)
    assert logits[eos] == 0 and torch.isfinite(logits).sum() <= len(engine.eos_ids)  # now: stop only
    # The tiny model rarely closes an object in budget: each output is an object so far, and
    # one that stopped parses.
    out = run(engine.chat(_user("Reply in JSON."), response_format={"type": "json_object"}, max_tokens=30,
                          n=3, temperature=1.0, seed=1))
    compiled = engine.grammars.compiler.compile_builtin_json_grammar()
    for choice in out.choices:
        text = choice.message.content
        assert text.startswith("{") and xgr.GrammarMatcher(compiled).accept_string(text)
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_choice_returns_tool_calls(engine, choice):
    out = run(engine.chat(_user("What is 2 plus 3?"), tools=TOOLS, tool_choice=choice, max_tokens=80, n=3,
                          temperature=1.0, seed=3))
    for c in out.choices:
        assert c.finish_reason == "tool_calls", c.message.content
        for call in c.message.tool_calls:
            args = json.loads(call.function.arguments)
            if choice != "required":
                assert call.function.name == "add"
            if call.function.name == "add":
                assert set(args) == {"a", "b"} and all(0 <= args[k] <= 99 for k in "ab")
            else:
                assert call.function.name == "weather" and args["unit"] in ("c", "f") and len(args["city"]) <= 8


def test_required_tool_call_may_pick_either_tool_and_strings_stay_bounded(engine):
    names = set()
    for seed in range(4):
        out = run(engine.chat(_user("Weather in Paris?"), tools=TOOLS, tool_choice="required", max_tokens=80,
                              temperature=1.0, seed=seed))
        assert out.choices[0].finish_reason == "tool_calls", out.text
        names |= {c.function.name for c in out.choices[0].message.tool_calls}
    assert names <= {"add", "weather"}


def test_tool_calls_are_read_with_a_json_decoder():
    text = "Sure " + tool_call_text("a", {"x": "</tool_call>"}) + tool_call_text("b", '{"n": 1}')
    assert parse_calls(text) == ("Sure", [{"name": "a", "arguments": '{"x": "</tool_call>"}'},
                                          {"name": "b", "arguments": '{"n": 1}'}])
    broken = "x <tool_call>{bad</tool_call> y " + tool_call_text("c", {"q": [1]}) + " z"
    assert parse_calls(broken) == parse_tool_calls(broken) == ("x <tool_call>{bad</tool_call> y  z",
                                                              [{"name": "c", "arguments": '{"q": [1]}'}])
    assert parse_calls("<tool_call>\n{\"name\": \"a\"") == ("<tool_call>\n{\"name\": \"a\"", [])


def test_tool_choice_none_leaves_tools_out(engine):
    out = run(engine.chat(_user("What is 2 plus 3?"), tools=TOOLS, tool_choice="none", max_tokens=5))
    assert out.usage.prompt_tokens == len(engine.encode(_user("What is 2 plus 3?")))
    assert out.choices[0].message.tool_calls is None


# -- streaming ------------------------------------------------------------------------------------
async def _collect(stream) -> list[dict[str, Any]]:
    return [chunk async for chunk in stream]


def test_stream_chat_equals_chat_and_ends_with_usage(engine):
    kw = {"max_tokens": 30, "logprobs": True, "top_logprobs": 2}
    for prompt in PROMPTS[:2]:
        whole = run(engine.chat(_user(prompt), **kw))
        chunks = run(_collect(engine.stream_chat(_user(prompt), include_usage=True, **kw)))
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        body = [c for c in chunks if c["choices"]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in body) == whole.text
        assert body[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
        lps = [t for c in body if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
        assert [t["logprob"] for t in lps] == pytest.approx([t.logprob for t in whole.choices[0].logprobs.content])
        usage = whole.usage.model_dump()
        # The stream repeats the prompt: its prefix is read from the prefix cache this time.
        streamed = chunks[-1]["usage"].pop("prompt_tokens_details")["cached_tokens"]
        assert usage.pop("prompt_tokens_details")["cached_tokens"] <= streamed < usage["prompt_tokens"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_stream_never_leaks_a_stop_string(engine):
    kw: dict[str, Any] = {"max_tokens": 40, "temperature": 1.0}
    for seed in range(20):  # a sample long enough to pick stop strings from
        free = run(engine.chat(_user(PROMPTS[1]), seed=seed, **kw)).text
        if len(free) > 12:
            break
    assert len(free) > 12
    for stop in (free[6:9], free[6:7], free[-3:]):
        want = run(engine.chat(_user(PROMPTS[1]), seed=seed, stop=[stop, "zzzz"], **kw))
        seen = ""
        for chunk in run(_collect(engine.stream_chat(_user(PROMPTS[1]), seed=seed, stop=[stop, "zzzz"], **kw))):
            seen += chunk["choices"][0]["delta"].get("content", "")
            assert stop not in seen
            assert want.text.startswith(seen)  # nothing sent is ever taken back
        assert seen == want.text and want.choices[0].finish_reason == "stop"


def test_stream_forced_tool_call_arrives_as_tool_calls(engine):
    chunks = run(_collect(engine.stream_chat(_user("What is 2 plus 3?"), tools=TOOLS, max_tokens=80,
                                             tool_choice={"type": "function", "function": {"name": "add"}})))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any("<tool_call>" in d.get("content", "") for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "add"
    assert set(json.loads(calls[0]["function"]["arguments"])) == {"a", "b"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_gate_holds_back_stop_prefixes_markers_and_broken_utf8():
    gate = _Gate(["ab", "xyz"], tools=True)
    assert gate.step("q a") == "q "  # "a" may start "ab"
    assert gate.step("q ac") == "ac"
    assert gate.step("q acx") == ""
    assert gate.step("q acxy") == ""
    assert gate.step("q acxy \ufffd") == "xy "  # an incomplete character waits
    assert gate.step("q acxy é <tool") == "é "
    assert gate.step("q acxy é <tool_call>{") == ""
    assert gate.rest("q acxy é <tool_call>{}") == "<tool_call>{}"


# -- legacy completions ---------------------------------------------------------------------------
def test_complete_echo_logprobs_equal_transformers(engine):
    prompt = "Mia has 3 cups. She buys 4 more cups."
    out = run(engine.complete(prompt, max_tokens=0, echo=True, logprobs=1))
    choice = out["choices"][0]
    ids = engine.tokenize(prompt)
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids),
                            "prompt_tokens_details": {"cached_tokens": 0}}  # scoring computes every position
    lp = choice["logprobs"]
    assert lp["tokens"] == [engine.piece(i) for i in ids] and lp["token_logprobs"][0] is None
    with torch.no_grad():
        ref = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), -1)
    want = [float(ref[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for t, top in enumerate(lp["top_logprobs"][1:]):
        (token, value), = top.items()
        assert token == engine.piece(int(ref[t].argmax())) and value == pytest.approx(float(ref[t].max()), abs=1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] == len(prompt) - len(lp["tokens"][-1])


def test_complete_generates_echoes_and_streams_the_same(engine):
    kw = {"max_tokens": 6, "echo": True, "logprobs": 2}
    out = run(engine.complete("The cat", **kw))
    plain = run(engine.complete(engine.tokenize("The cat"), max_tokens=6))
    choice = out["choices"][0]
    assert choice["text"] == "The cat" + plain["choices"][0]["text"]
    assert len(choice["logprobs"]["tokens"]) == len(engine.tokenize("The cat")) + out["usage"]["completion_tokens"]
    chunks = run(_collect(engine.stream_complete("The cat", include_usage=True, **kw)))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
    assert chunks[-1]["usage"] == out["usage"]
    streamed = [v for c in chunks if c["choices"] for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(choice["logprobs"]["token_logprobs"])


def test_tokenize_round_trips(engine):
    ids = engine.tokenize("Mia has 3 cups.")
    assert ids and engine.detokenize(ids) == "Mia has 3 cups."


# -- refusals -------------------------------------------------------------------------------------
def test_context_length_is_enforced(engine):
    n = engine.context_length
    with pytest.raises(ContextLengthExceeded, match=f"maximum context length is {n} tokens"):
        run(engine.chat(_user("hi"), max_tokens=n))
    with pytest.raises(ContextLengthExceeded):
        run(engine.complete([5] * (n + 1), max_tokens=0, echo=True, logprobs=0))
    with pytest.raises(ContextLengthExceeded):
        run(engine.complete([5] * n, max_tokens=1))
    full = run(engine.complete([5] * n, max_tokens=0, echo=True, logprobs=0))  # scoring fills the context
    assert len(full["choices"][0]["logprobs"]["token_logprobs"]) == n


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 0}, "n"), ({"n": 99}, "n"), ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_tokens": -1}, "max_tokens"), ({"top_logprobs": 21}, "top_logprobs"),
    ({"top_k": -1}, "top_k"), ({"stop": [3]}, "stop"), ({"messages": []}, "messages"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}},
     "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
])
def test_bad_chat_arguments_name_their_param(engine, kwargs, param):
    messages = kwargs.pop("messages", _user("hi"))
    with pytest.raises(BadRequest) as err:
        run(engine.chat(messages, **kwargs))
    assert err.value.param == param
    with pytest.raises(BadRequest):  # streams refuse at the call, before any chunk
        engine.stream_chat(messages, **kwargs)


def test_bad_completion_arguments_name_their_param(engine):
    for kwargs, param in [({"logprobs": 21}, "logprobs"), ({"prompt": ""}, "prompt"),
                          ({"prompt": [10**9]}, "prompt"), ({"max_tokens": -2}, "max_tokens")]:
        prompt = kwargs.pop("prompt", "hi")
        with pytest.raises(BadRequest) as err:
            run(engine.complete(prompt, **kwargs))
        assert err.value.param == param


def test_a_full_queue_is_overloaded(engine):
    assert issubclass(EngineOverloaded, Overloaded)
    saved, engine.scheduler.max_waiting = engine.scheduler.max_waiting, 0
    try:
        with pytest.raises(Overloaded):
            run(engine.chat(_user("hi"), max_tokens=2))
        with pytest.raises(Overloaded):
            run(_collect(engine.stream_chat(_user("hi"), max_tokens=2)))
    finally:
        engine.scheduler.max_waiting = saved


# -- cancellation ---------------------------------------------------------------------------------
def test_cancelled_chat_frees_its_slots(engine):
    async def go() -> None:
        task = asyncio.create_task(engine.chat(_user("hi"), response_format=LONG, n=4, temperature=1.0))
        assert await _until(lambda: engine.scheduler.running == 4)
        assert not task.done()  # the grammar cannot end before max_tokens: the request is long
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _until(lambda: engine.scheduler.running == 0 and engine.scheduler.queue_depth == 0)

    run(go())


def test_closed_stream_frees_its_slots(engine):
    async def go() -> None:
        stream = engine.stream_chat(_user("hi"), response_format=LONG, n=2, temperature=1.0)
        async for chunk in stream:
            if chunk["choices"][0]["delta"].get("content"):
                break
        assert await _until(lambda: engine.scheduler.running == 2)  # the second may still be starting
        await stream.aclose()
        assert await _until(lambda: engine.scheduler.running == 0)

    run(go())
