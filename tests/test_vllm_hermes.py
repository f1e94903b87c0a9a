"""vLLM's side of our tool calls, without starting vLLM: the ``assist_hermes`` parser streams
calls written arguments first (forced calls: tests/test_engine_safety.py)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace
from typing import Any

import pytest

from assist.chat_format import tool_call_text

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def _parser(stock: bool = False) -> Any:
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    from assist.engine._vllm_hermes import AssistHermesToolParser

    return (Hermes2ProToolParser if stock else AssistHermesToolParser)(SimpleNamespace(get_vocab=dict))


def _stream(parser: Any, text: str, step: int) -> tuple[str, list[dict[str, Any]]]:
    """Feed ``text`` ``step`` characters at a time as vLLM does; (content, calls) as a client
    assembles them from the deltas."""
    content, calls, prev = "", [], ""
    for end in [*range(step, len(text), step), len(text)]:
        cur = text[:end]
        delta = parser.extract_tool_calls_streaming(prev, cur, cur[len(prev):], [], [], [], None)
        prev = cur
        if delta is None:
            continue
        content += delta.content or ""
        for tc in delta.tool_calls:
            while len(calls) <= tc.index:
                calls.append({"name": "", "arguments": ""})
            fn = tc.function.model_dump(exclude_none=True) if tc.function else {}
            calls[tc.index]["name"] += fn.get("name", "")
            calls[tc.index]["arguments"] += fn.get("arguments", "")
    return content, calls


def test_members_reads_complete_and_unfinished_objects() -> None:
    from assist.engine._vllm_hermes import members

    text = '{"arguments": {"a": [1, "}"]}, "name": "f"}'
    got = members(text)
    assert {k: text[s:e] for k, (s, e) in got.items()} == {"arguments": '{"a": [1, "}"]}', "name": '"f"'}
    cut = '{"name": "f", "arguments": {"a": [1, "}'
    assert members(cut) == {"name": (9, 12), "arguments": (27, None)}
    assert members('{"arguments": {"a": 1}, "na') == {"arguments": (14, 22)}
    assert members("") == members("[1]") == members('{"a" 1}') == {}


@pytest.mark.parametrize("step", [1, 3, 7])
def test_calls_written_arguments_first_stream_whole(step: int) -> None:
    # An argument called "name" must not pass for the function's name.
    calls = [("lookup", {"name": "Ada", "note": "a, \"b\"}"}), ("calculator", {"expression": "783+38"})]
    text = "Let me look.\n" + "".join(tool_call_text(n, a) for n, a in calls)
    assert text.count('"arguments"') == 2 and text.index('"arguments"') < text.index('"name": "lookup"')
    content, got = _stream(_parser(), text, step)
    assert content.strip() == "Let me look."
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == calls
    whole = _parser().extract_tool_calls(text, None)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls] == calls


@pytest.mark.parametrize("step", [1, 4])
def test_calls_written_name_first_stream_as_vllms_own_parser_streams_them(step: int) -> None:
    text = 'Sure.<tool_call>\n{"name": "calculator", "arguments": {"expression": "7*6"}}\n</tool_call>'
    ours, stock = _stream(_parser(), text, step), _stream(_parser(stock=True), text, step)
    assert ours == stock
    assert ours[1] == [{"name": "calculator", "arguments": '{"expression": "7*6"}'}]


def test_the_stock_parser_would_garble_arguments_first_calls() -> None:
    # Why the plugin exists: vLLM's own streaming takes everything after "arguments": as them.
    _, calls = _stream(_parser(stock=True), tool_call_text("calculator", {"expression": "1+2"}), 1)
    assert calls and calls[0]["arguments"] != '{"expression": "1+2"}'
