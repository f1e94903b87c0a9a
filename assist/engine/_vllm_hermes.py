"""vLLM's Hermes tool parser, reading each call's keys in any order: the ``assist_hermes`` parser.

Our models write a call arguments first (``{"arguments": {...}, "name": "calculator"}``, see
:func:`assist.chat_format.tool_call_text`: the copy of an expression into the call then sits
right after the text it copies). vLLM's ``hermes`` parser reads whole calls with ``json.loads``,
in any order, but while *streaming* it finds the name with a regular expression and takes the
arguments as everything after ``"arguments":``: on an arguments-first call that streams
``{"expression": "7*6"}, "name": "calculator"`` as the arguments, and an argument called
``name`` would pass for the function's. This parser reads the call's top-level members with a
JSON decoder instead: the name once its string is complete, the arguments once complete, or
(last member, name already known) as far as they have come, as vLLM's parser streams them.

vLLM loads this file in its API server process (``--tool-parser-plugin``, which
:class:`assist.engine.VLLMServer` passes with ``--tool-call-parser assist_hermes``); it imports
vLLM (the parser exists only where vLLM does), so nothing else needs it.
"""

from __future__ import annotations

import json
import re

__all__ = ["AssistHermesToolParser", "members"]

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")


def _skip(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()  # type: ignore[union-attr]  # \s* always matches


def members(text: str) -> dict[str, tuple[int, int | None]]:
    """The top-level members of a JSON object, complete or cut short: key -> (where its value
    starts, where it ends, or None while it is unfinished). Reading stops at the first thing
    that is not yet (or never) JSON."""
    found: dict[str, tuple[int, int | None]] = {}
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        return found
    pos += 1
    while True:
        pos = _skip(text, pos)
        try:
            key, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            return found
        pos = _skip(text, pos)
        if not isinstance(key, str) or not text.startswith(":", pos):
            return found
        start = _skip(text, pos + 1)
        try:
            _, end = _DECODER.raw_decode(text, start)
        except ValueError:
            found[key] = (start, None)
            return found
        found[key] = (start, end)
        pos = _skip(text, end)
        if not text.startswith(",", pos):
            return found
        pos += 1


try:  # vLLM's API server loads this file; elsewhere (vLLM not installed) members() alone is here
    from vllm.tool_parsers.abstract_tool_parser import ToolParserManager
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
except ImportError:
    __all__ = ["members"]
else:
    @ToolParserManager.register_module("assist_hermes")
    class AssistHermesToolParser(Hermes2ProToolParser):
        """Hermes calls with their keys in any order (see the module docstring)."""

        @staticmethod
        def _extract_tool_name(tc_json: str) -> str | None:
            span = members(tc_json).get("name")
            if span is None or span[1] is None:
                return None
            name = json.loads(tc_json[span[0]:span[1]])
            return name if isinstance(name, str) and name else None

        @staticmethod
        def _extract_tool_args(tc_json: str, is_complete: bool) -> str | None:
            span = members(tc_json).get("arguments")
            if span is None:
                return None
            start, end = span
            return tc_json[start:end] if end is not None else tc_json[start:].rstrip()
