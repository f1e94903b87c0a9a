"""The ``tools`` strategy and its toolbox against FakeChatModel: the loop and its message
format (byte-identical to the SFT tool conversations once rendered), parallel calls,
errors that become tool messages, turns, usage and budget; the ``@tool`` schema, the
calculator's refusals, entry-point discovery and the spec."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import random
import re
from typing import Literal

import pytest

import strategies.tools  # noqa: F401  (registers the "tools" spec)
from assist.prompts import CALCULATOR_TOOL, Passage
from assist.testing import FakeChatModel, tool_reply
from assist.types import FunctionCall, Message, ToolCall
from strategies import SelfConsistency, parse
from strategies._toolbox import (
    Tool,
    ToolError,
    UnknownTool,
    discover_tools,
    get_tool,
    retrieval_tool,
    tool,
)
from strategies.tools import ToolUse


def calls(*pairs: tuple[str, str], content: str | None = None) -> Message:
    """One assistant reply calling several tools: (name, raw JSON arguments) pairs."""
    return Message(role="assistant", content=content, tool_calls=[
        ToolCall(id=f"call_{i}", function=FunctionCall(name=n, arguments=a)) for i, (n, a) in enumerate(pairs)])


def tool_messages(fake: FakeChatModel, call: int = -1) -> list[dict]:
    return [m for m in fake.calls[call]["messages"] if m["role"] == "tool"]


# -- the loop -------------------------------------------------------------------------------------
def test_loop_calls_then_tool_messages_then_the_answer():
    fake = FakeChatModel(replies=[tool_reply("calculator", {"expression": "5+3"}, "call_a"), "#### 8"])
    result = ToolUse().run_sync(fake, "Mia has 5 apples and buys 3. How many?")
    first, second = fake.calls
    assert first["tools"] == [CALCULATOR_TOOL] and first["temperature"] == 0.0
    user, assistant, reply = second["messages"]
    assert assistant["tool_calls"][0]["id"] == "call_a"
    assert assistant["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "5+3"}'}
    assert reply == {"role": "tool", "tool_call_id": "call_a", "name": "calculator", "content": "8"}
    assert result.answer == "8" and result.calls == 2
    step = next(s for s in result.trace if s["step"] == "tool")
    assert step["name"] == "calculator" and step["arguments"] == {"expression": "5+3"}
    assert step["result"] == "8" and step["error"] is None


def test_loop_renders_exactly_like_the_sft_tool_conversations():
    from assist.chat_format import render
    from evals.tasks import ArithTask
    from training.conversations import arith_tools

    sample = ArithTask()._make(random.Random(3), "t")
    taught = arith_tools(sample, random.Random(3))
    replies: list[Message | str] = []
    for m in taught["messages"][1:]:
        if m["role"] == "assistant" and m.get("tool_calls"):
            tc = m["tool_calls"][0]  # compact JSON: the strategy re-serialises it like `tojson`
            raw = json.dumps(tc["function"]["arguments"], separators=(",", ":"))
            replies.append(Message(role="assistant", content=m["content"], tool_calls=[
                ToolCall(id=tc["id"], function=FunctionCall(name="calculator", arguments=raw))]))
        elif m["role"] == "assistant":
            replies.append(m["content"])
    fake = FakeChatModel(replies=replies)
    result = ToolUse(max_turns=len(replies)).run_sync(fake, sample.question)
    seen = [*fake.calls[-1]["messages"], {"role": "assistant", "content": result.text}]
    assert render(seen, fake.calls[-1]["tools"]) == render(taught["messages"], taught["tools"])
    assert result.answer == sample.answer


def _barrier_tool(size: int) -> Tool:
    arrived: list[str] = []

    @tool
    async def meet(tag: str) -> str:
        """Return only once ``size`` calls are running at the same time."""
        arrived.append(tag)
        for _ in range(200):
            if len(arrived) >= size:
                return tag.upper()
            await asyncio.sleep(0.01)
        raise RuntimeError("the calls ran one after another")

    return meet


def test_parallel_calls_run_concurrently_and_reply_in_call_order():
    fake = FakeChatModel(replies=[calls(*[("meet", json.dumps({"tag": t})) for t in "abc"]), "#### 1"])
    ToolUse(tools=(_barrier_tool(3),)).run_sync(fake, "go")
    replies = tool_messages(fake)
    assert [(m["tool_call_id"], m["content"]) for m in replies] == [("call_0", "A"), ("call_1", "B"),
                                                                   ("call_2", "C")]


def test_sequential_mode_keeps_order():
    fake = FakeChatModel(replies=[calls(("calculator", '{"expression": "1+1"}'),
                                        ("calculator", '{"expression": "2*3"}')), "#### 6"])
    ToolUse(parallel=False).run_sync(fake, "go")
    assert [m["content"] for m in tool_messages(fake)] == ["2", "6"]


def test_max_turns_then_one_last_call_without_tools():
    fake = FakeChatModel(replies=[tool_reply("calculator", {"expression": "1+1"})])  # never stops
    result = ToolUse(max_turns=2).run_sync(fake, "loop forever")
    assert len(fake.calls) == 3
    assert ["tools" in c for c in fake.calls] == [True, True, False]
    assert sum(s["step"] == "tool" for s in result.trace) == 2  # the last reply's calls never run
    assert result.answer is None


@tool
def boom() -> str:
    """Always fails."""
    raise RuntimeError("kaput")


@tool
async def slow() -> str:
    """Never finishes in time."""
    await asyncio.sleep(5)
    return "late"


def test_raising_and_timing_out_tools_become_error_messages_and_the_loop_goes_on():
    fake = FakeChatModel(replies=[calls(("boom", "{}"), ("slow", "{}")), "#### 1"])
    result = ToolUse(tools=(boom, slow), tool_timeout_s=0.1).run_sync(fake, "go")
    assert [m["content"] for m in tool_messages(fake)] == ["error: RuntimeError: kaput",
                                                          "error: slow timed out after 0.1s"]
    assert result.answer == "1"
    errors = [s["error"] for s in result.trace if s["step"] == "tool"]
    assert errors == ["RuntimeError: kaput", "slow timed out after 0.1s"]


@pytest.mark.parametrize("name, raw, expected", [
    ("nope", "{}", "error: unknown tool 'nope'; available: calculator"),
    ("calculator", '{"expression": "1+', "error: arguments are not valid JSON"),
    ("calculator", "[1, 2]", "error: arguments must be a JSON object, not list"),
    ("calculator", '{"expr": "1+1"}', "error: unknown argument(s) expr; calculator takes expression"),
    ("calculator", "{}", "error: missing required argument(s) expression"),
    ("calculator", '{"expression": 5}', "error: argument 'expression' must be string, not integer"),
    ("calculator", '{"expression": "os.system(1)"}', "error: function calls are not allowed"),
])
def test_bad_calls_become_error_messages(name: str, raw: str, expected: str):
    fake = FakeChatModel(replies=[calls((name, raw)), "#### 2"])
    result = ToolUse().run_sync(fake, "go")
    (reply,) = tool_messages(fake)
    assert reply["content"].startswith(expected) and reply["tool_call_id"] == "call_0"
    assert result.answer == "2"
    if "JSON" in expected:  # what the model wrote goes back as written
        assert fake.calls[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] == raw


def test_usage_is_the_sum_over_calls():
    fake = FakeChatModel(replies=[tool_reply("calculator", {"expression": "5+3"}), "the answer is #### 8"])
    result = ToolUse().run_sync(fake, "What is 5+3?")
    # Call 1: 3 prompt words, one tool call (8). Call 2: 3 + "8" prompt, 5 completion words.
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3 + 4, 8 + 5)
    traced = [s["usage"] for s in result.trace if s["step"] == "call"]
    assert sum(u["total_tokens"] for u in traced) == result.usage.total_tokens


def test_budget_stops_the_loop_with_what_there_is():
    fake = FakeChatModel(replies=[tool_reply("calculator", {"expression": "5+3"}, "c1"), "#### 8"])
    result = ToolUse(budget=10).run_sync(fake, "What is 5+3?")  # the first call spends 11
    assert result.budget_exhausted and result.calls == 1 and result.answer is None
    assert result.message.tool_calls and result.message.tool_calls[0].id == "c1"


# -- the toolbox ----------------------------------------------------------------------------------
def test_decorator_derives_the_openai_schema():
    @tool
    def weather(city: str, days: int = 1, units: Literal["c", "f"] = "c",
                tags: list[str] | None = None, verbose: bool = False, scale: float | None = None) -> str:
        """Forecast the weather.

        Args:
            city: The city's name.
            days (int): How many days
                ahead.
        """
        return f"{city}:{days}:{units}:{tags}:{verbose}:{scale}"

    assert weather.schema == {"type": "function", "function": {
        "name": "weather", "description": "Forecast the weather.", "parameters": {
            "type": "object", "required": ["city"], "properties": {
                "city": {"type": "string", "description": "The city's name."},
                "days": {"type": "integer", "description": "How many days ahead."},
                "units": {"type": "string", "enum": ["c", "f"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "verbose": {"type": "boolean"}, "scale": {"type": "number"}}}}}
    assert asyncio.run(weather.call({"city": "Oslo", "tags": ["x"], "scale": None})) == "Oslo:1:c:['x']:False:None"
    assert weather("Rome") == "Rome:1:c:None:False:None"  # still a plain function
    for bad, why in (({"city": "X", "units": "k"}, 'must be one of "c", "f"'),
                     ({"city": "X", "tags": [1]}, "item 0 must be string"),
                     ({"city": "X", "days": True}, "must be integer, not boolean")):
        with pytest.raises(ToolError, match=why):
            asyncio.run(weather.call(bad))


def test_decorator_with_arguments_and_async_functions():
    @tool(name="add", description="Add two integers.")
    async def plus(a: int, b: int) -> int:
        return a + b

    assert plus.name == "add" and plus.schema["function"]["description"] == "Add two integers."
    assert asyncio.run(plus.call({"a": 2, "b": 40})) == "42"

    @tool
    def maybe(note: str | None) -> str:  # Optional without a default: not required, None if left out
        return repr(note)

    assert "required" not in maybe.schema["function"]["parameters"]
    assert asyncio.run(maybe.call({})) == "None"
    with pytest.raises(TypeError, match="type hint"):
        tool(lambda x: x)


@pytest.mark.parametrize("expression, expected", [
    ("3*(4+5)", "27"), ("54/2", "27"), ("7/2", "3.5"), ("-2**2", "-4"), ("1,000 * 3 =", "3000"),
    ("0.1+0.2", "0.3"), ("17 // 5", "3"), ("17 % 5", "2"),
])
def test_calculator_evaluates_like_the_training_data(expression: str, expected: str):
    assert asyncio.run(get_tool("calculator").call({"expression": expression})) == expected


@pytest.mark.parametrize("expression, why", [
    ("__import__('os')", "function calls are not allowed"), ("2**10**10", "result too large"),
    ("x + 1", "names are not allowed"), ("(1).real", "attribute access is not allowed"),
    ("().__class__", "attribute access is not allowed"), ("1/0", "division by zero"),
    ("2^8", "use ** for powers"), ("'a' * 3", "is not a number"), ("[1] * 3", "List is not allowed"),
    ("9" * 501, "longer than"), ("lambda: 1", "Lambda is not allowed"),
])
def test_calculator_refuses_with_a_clear_message(expression: str, why: str):
    with pytest.raises(ToolError, match=re.escape(why)):
        asyncio.run(get_tool("calculator").call({"expression": expression}))


def test_calculator_schema_is_the_trained_one():
    assert get_tool("calculator").schema == CALCULATOR_TOOL


def test_retrieval_tool_renders_passages_from_sync_and_async_stores():
    passages = [Passage("p1", "Paris is in France."), Passage("p2", "Rome is in Italy.")]

    async def async_search(query: str, k: int) -> list[Passage]:
        return passages[:k]

    for search in (lambda q, k: passages[:k], async_search):
        found = retrieval_tool(search, k=2)
        assert found.name == "search" and found.schema["function"]["parameters"]["required"] == ["query"]
        assert asyncio.run(found.call({"query": "capital"})) == "[p1] Paris is in France.\n[p2] Rome is in Italy."
    assert asyncio.run(retrieval_tool(lambda q, k: []).call({"query": "x"})) == "no passages found"


def shout(text: str) -> str:
    """Upper-case the text."""
    return text.upper()


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch):
    eps = [importlib.metadata.EntryPoint("loud", f"{__name__}:shout", "assist.tools"),
           importlib.metadata.EntryPoint("boomy", f"{__name__}:boom", "assist.tools"),
           importlib.metadata.EntryPoint("broken", "no_such_module_xyz:thing", "assist.tools")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps if group == "assist.tools" else [])
    yield discover_tools(refresh=True)
    monkeypatch.undo()
    discover_tools(refresh=True)


def test_entry_points_are_discovered_and_broken_ones_skipped(plugins, caplog: pytest.LogCaptureFixture):
    assert set(plugins) == {"loud", "boomy"}
    assert get_tool("loud").schema["function"]["name"] == "loud"  # named as the entry point
    with caplog.at_level(logging.WARNING):
        discover_tools(refresh=True)
    assert "broken" in caplog.text
    fake = FakeChatModel(replies=[calls(("loud", '{"text": "hi"}')), "#### HI"])
    assert parse("tools:use=calculator+loud").run_sync(fake, "go").answer == "hi"
    assert tool_messages(fake)[0]["content"] == "HI"
    with pytest.raises(UnknownTool, match="available: boomy, calculator, loud, python"):
        get_tool("nope")


# -- the spec -------------------------------------------------------------------------------------
def test_spec_parses_and_composes_under_self_consistency():
    s = parse("tools:use=calculator+python,max_turns=6,t=0.2,parallel=false")
    assert isinstance(s, ToolUse) and s.tools == ("calculator", "python") and s.max_turns == 6
    assert s.temperature == 0.2 and s.parallel is False and s.spec.startswith("tools:use=")
    sc = parse("sc@3(tools)")
    assert isinstance(sc, SelfConsistency) and isinstance(sc.inner, ToolUse)
    assert sc.inner.temperature == 0.7 and sc.inner.tools == ("calculator",) and sc.inner.spec == "tools"

    def respond(messages, kwargs):
        if messages[-1]["role"] == "tool":
            return f"#### {messages[-1]['content']}"
        return tool_reply("calculator", {"expression": "6*7"})

    fake = FakeChatModel(respond=respond)
    result = sc.run_sync(fake, "What is 6*7?")
    assert result.answer == "42" and result.calls == 6
    assert all(c["temperature"] == 0.7 for c in fake.calls)
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        parse("tools:use=nope")
