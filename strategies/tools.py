"""``tools``: let the model call tools (calculator, python, search, plugins) until it answers.

The loop mirrors the SFT tool conversations (``training.conversations.arith_tools``), so
the small model meets at inference what it learned: each model call carries ``tools=``;
a reply with ``tool_calls`` is appended as the assistant message (its text and its calls),
followed by one ``{"role": "tool", "tool_call_id", "name", "content"}`` message per call in
call order, and the model is called again; a reply without tool calls is the answer.

- Several calls in one reply run concurrently (``parallel=true``), each under
  ``tool_timeout_s``; their messages still follow the order of the calls.
- A failure never ends the loop: an unknown tool, arguments that are not a JSON object, a
  tool that raises or times out each become a tool message ``error: ...`` the model reads.
- ``max_turns`` bounds the rounds of tool calls. A model still calling tools after the
  last round is asked once more *without* ``tools`` so that it answers in text from the
  results it has (at most ``max_turns + 1`` calls); its extra calls are not executed.
- A spent token budget ends the loop with what there is: the last reply, whose answer is
  None while it still calls tools (its text then leads into a call, it is no answer).

Streamed (``stream``), the answer is sent as soon as it is known to be one: a turn that
is offered tools may still lead into a call however it begins (the SFT turns write a
sentence, then call), so it is sent when it ends without one; the extra round without
tools is the answer from its first token and streams token by token.

Every call and result goes into the trace as ``{"step": "tool", ...}``. In a spec the
tools join with ``+``: ``tools:use=calculator+python,max_turns=6``; over it,
``sc@8(tools)`` votes over eight tool-using attempts at its temperature.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from assist.types import Message, ToolCall
from strategies._base import (
    Bound,
    BudgetExhausted,
    OptionError,
    Recorder,
    Result,
    StrategyBase,
    check_common,
    gather,
    need_bool,
    need_int,
    need_number,
)
from strategies._prompted import final_stage, resolve_extractor
from strategies._spec import register
from strategies._toolbox import Tool, ToolError, UnknownTool, get_tool
from strategies.extract import Extractor

__all__ = ["ToolUse", "tool_use"]


@dataclass(repr=False)
class ToolUse(StrategyBase):
    tools: tuple[str | Tool, ...] | str = ("calculator",)
    max_turns: int = 4
    temperature: float = 0.0
    seed: int | None = None  # sampled runs (t > 0) reproduce; turn i uses seed + i
    max_tokens: int | None = None
    extractor: str | Extractor = "default"
    budget: int | None = None
    parallel: bool = True
    tool_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        check_common(self)
        need_int(self.max_turns, "max_turns", lo=0)
        need_number(self.tool_timeout_s, "tool_timeout_s", lo=0.0, hi=600.0, lo_open=True)
        self.parallel = need_bool(self.parallel, "parallel")
        self.extract = resolve_extractor(self.extractor)
        if isinstance(self.tools, str):
            names: Sequence[str | Tool] = re.split(r"[+,\s]+", self.tools.strip())
        elif isinstance(self.tools, Sequence):
            names = self.tools
        else:
            raise OptionError("tools", f"must name tools (calculator+python), not {type(self.tools).__name__}")
        resolved: dict[str, Tool] = {}
        for item in names:
            if isinstance(item, Tool):
                resolved[item.name] = item
            elif isinstance(item, str) and item:
                try:
                    resolved[item] = get_tool(item)
                except UnknownTool as exc:
                    raise OptionError("tools", str(exc)) from None
            elif item:
                raise OptionError("tools", f"must be tool names or Tools, not {type(item).__name__}")
        if not resolved:
            raise OptionError("tools", "must name at least one tool")
        # Normalised, so dataclasses.replace (as sc@k(tools) does) re-resolves the same set.
        self.tools = tuple(i for i in names if i)
        self._tools = resolved

    def bound(self, max_tokens: int) -> Bound:
        """One call per round of tool calls, and the last one answering without tools."""
        return super().bound(max_tokens) * (self.max_turns + 1)

    async def solve(self, model: Recorder, messages: list[dict[str, Any]]) -> Result:
        chat = [dict(m) for m in messages]
        schemas = [t.schema for t in self._tools.values()]
        final: Message | None = None
        try:
            for turn in range(self.max_turns + 1):
                last = turn == self.max_turns  # the extra round: answer, no more tools
                kwargs: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens,
                                          "seed": None if self.seed is None else self.seed + turn}
                if not last:
                    kwargs["tools"] = schemas
                else:  # known to be the answer before it starts: streamed as it is written
                    kwargs.update(final_stage(model))
                completion = await model.chat(chat, **kwargs)
                final = completion.choices[0].message
                if not final.tool_calls or last:
                    break
                calls = final.tool_calls
                chat.append({"role": "assistant", "content": final.content,
                             "tool_calls": [_call_dict(c) for c in calls]})
                if self.parallel:
                    replies = await gather(*(self._run(model, c, turn) for c in calls))
                else:
                    replies = [await self._run(model, c, turn) for c in calls]
                chat.extend(replies)
        except BudgetExhausted:
            pass
        if final is None:
            return model.result(Message(role="assistant", content=""), None)
        # A reply still calling tools is mid-solution: its text is a lead, not an answer.
        return model.result(final, None if final.tool_calls else self.extract(final.content or ""))

    async def _run(self, model: Recorder, call: ToolCall, turn: int) -> dict[str, Any]:
        """One call executed: its tool message, success or error, and its trace entry."""
        name, raw = call.function.name, call.function.arguments
        t0 = time.perf_counter()
        arguments: Any = raw
        result: str | None = None
        error: str | None = None
        try:
            arguments = _arguments(raw)
            target = self._tools.get(name)
            if target is None:
                raise ToolError(f"unknown tool {name!r}; available: {', '.join(self._tools)}")
            result = await asyncio.wait_for(target.call(arguments), self.tool_timeout_s)
        except ToolError as exc:
            error = str(exc)
        except TimeoutError as exc:
            late = time.perf_counter() - t0 >= self.tool_timeout_s
            error = f"{name} timed out after {self.tool_timeout_s:g}s" if late else f"TimeoutError: {exc}"
        except Exception as exc:  # the tool's own bug: the model reads it, the loop goes on
            error = f"{type(exc).__name__}: {exc}"
        model.note(step="tool", turn=turn, id=call.id, name=name, arguments=arguments,
                   result=result, error=error, seconds=round(time.perf_counter() - t0, 4))
        content = result if error is None else f"error: {error}"
        return {"role": "tool", "tool_call_id": call.id, "name": name, "content": content}


def _arguments(raw: str | Any) -> dict[str, Any]:
    if not isinstance(raw, str):
        value = raw  # some servers send the object itself
    else:
        try:
            value = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolError(f"arguments are not valid JSON ({exc.msg}): {raw[:200]!r}") from None
    if not isinstance(value, dict):
        raise ToolError(f"arguments must be a JSON object, not {type(value).__name__}")
    return value


def _call_dict(call: ToolCall) -> dict[str, Any]:
    """The call as the next request carries it; valid JSON is re-serialised the way the
    chat template's ``tojson`` wrote the training data, so the prompt matches it."""
    arguments = call.function.arguments
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        if isinstance(parsed, dict):
            arguments = json.dumps(parsed, ensure_ascii=False)
    except ValueError:
        pass  # invalid JSON goes back as written; the tool message says what is wrong
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": arguments}}


@register("tools", options={"use"} | {f.name for f in dataclasses.fields(ToolUse)})
def tool_use(*, use: str | Sequence[str | Tool] | None = None, **options: Any) -> ToolUse:
    """The spec factory: ``use=calculator+python`` names the tools (default: calculator)."""
    if use is not None:
        options["tools"] = use
    try:
        return ToolUse(**options)
    except OptionError as exc:
        if exc.option == "tools" and use is not None:  # the spec wrote use=..., name that
            raise OptionError("use", exc.message) from None
        raise
