"""Tools a model may call: the ``@tool`` decorator, the registry and the built-ins.

``@tool`` turns a typed function (sync or async) into a :class:`Tool` whose OpenAI function
schema comes from the type hints (str, int, float, bool, list[...], Literal, Optional) and
the docstring (first line: the description; a Google-style ``Args:`` section: the
parameters' descriptions). Parameters with a default, or Optional, are not required.

Other packages add tools through the entry-point group ``assist.tools``::

    [project.entry-points."assist.tools"]
    weather = "my_pkg.tools:weather"   # a Tool, or a plain typed function

Names resolve built-ins and :func:`register_tool` first, so an installed package cannot
take over ``calculator``; a broken entry point is logged and skipped. Built-ins:
``calculator`` (exactly the schema the assistant was trained on), ``python`` (the
:mod:`strategies._sandbox`); :func:`retrieval_tool` builds a ``search`` tool over any store.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import inspect
import json
import logging
import re
import types
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, overload

from assist.errors import BadRequest, NotFound
from assist.prompts import CALCULATOR_TOOL, Passage
from strategies._calculator import CalculatorError, evaluate, format_number
from strategies._sandbox import SandboxResult, run_python

__all__ = [
    "Tool",
    "ToolError",
    "UnknownTool",
    "available_tools",
    "discover_tools",
    "get_tool",
    "python_tool",
    "register_tool",
    "retrieval_tool",
    "tool",
]

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "assist.tools"


class ToolError(BadRequest):
    """A failure the model should read and can act on (bad arguments, a refused input)."""


class UnknownTool(NotFound):
    """No tool of that name among the built-ins, registered and installed tools."""


@dataclass(frozen=True)
class Tool:
    """A callable the model may request: its name, OpenAI schema, and implementation."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] = field(repr=False)
    nullable: frozenset[str] = frozenset()  # Optional parameters: null is a valid value
    none_if_missing: frozenset[str] = frozenset()  # ... and those without a default

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI ``{"type": "function", "function": {...}}`` entry for ``tools=``."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": copy.deepcopy(self.parameters)}}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The decorated function still works as a plain function."""
        return self.fn(*args, **kwargs)

    async def call(self, arguments: Mapping[str, Any]) -> str:
        """Validate the model's arguments, run the tool, and render its result as text.

        Sync functions run in a worker thread so they neither block the loop nor defeat
        the caller's timeout (a timed-out thread finishes in the background).
        """
        kwargs = self._bind(arguments)
        if inspect.iscoroutinefunction(self.fn):
            result = await self.fn(**kwargs)
        else:
            result = await asyncio.to_thread(self.fn, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        return render(result)

    def _bind(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(arguments, Mapping):
            raise ToolError(f"arguments must be a JSON object, not {_json_type(arguments)}")
        props: dict[str, Any] = self.parameters.get("properties", {})
        unknown = sorted(set(arguments) - set(props))
        if unknown:
            raise ToolError(f"unknown argument(s) {', '.join(unknown)}; {self.name} takes "
                            f"{', '.join(props) or 'no arguments'}")
        missing = [r for r in self.parameters.get("required", []) if r not in arguments]
        if missing:
            raise ToolError(f"missing required argument(s) {', '.join(missing)}")
        for key, value in arguments.items():
            problem = None if value is None and key in self.nullable else _check(value, props[key])
            if problem:
                raise ToolError(f"argument {key!r} {problem}")
        return {**{k: None for k in self.none_if_missing}, **arguments}


def render(result: Any) -> str:
    """A tool result as the text of a tool message (numbers as the training data writes them)."""
    if isinstance(result, str):
        return result
    if result is None:
        return ""
    if isinstance(result, bool):
        return "true" if result else "false"
    if isinstance(result, int | float):
        return format_number(result)
    return json.dumps(result, ensure_ascii=False, default=str)


# -- the decorator --------------------------------------------------------------------------------
@overload
def tool(fn: Callable[..., Any], /, *, name: str | None = None, description: str | None = None) -> Tool: ...
@overload
def tool(*, name: str | None = None, description: str | None = None) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
         description: str | None = None) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """``@tool`` or ``@tool(name=..., description=...)``: a :class:`Tool` from a typed function."""

    def make(f: Callable[..., Any]) -> Tool:
        return _from_function(f, name, description)

    return make(fn) if fn is not None else make


def _from_function(fn: Callable[..., Any], name: str | None, description: str | None) -> Tool:
    summary, docs = _docstring(fn)
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    nullable: set[str] = set()
    fill: set[str] = set()
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"tool {fn.__name__}: parameter {param.name} must be passable by name")
        if param.name not in hints:
            raise TypeError(f"tool {fn.__name__}: parameter {param.name} needs a type hint")
        hint = hints[param.name]
        prop = _schema(hint)
        if param.name in docs:
            prop["description"] = docs[param.name]
        properties[param.name] = prop
        if _is_optional(hint):
            nullable.add(param.name)
            if param.default is param.empty:
                fill.add(param.name)
        elif param.default is param.empty:
            required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return Tool(name=name or fn.__name__, description=description or summary,
                parameters=parameters, fn=fn, nullable=frozenset(nullable),
                none_if_missing=frozenset(fill))


_SCALARS: dict[Any, str] = {str: "string", bool: "boolean", int: "integer", float: "number",
                            dict: "object", list: "array"}


def _schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of a parameter's type hint."""
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple, Sequence, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        return {"type": "array", "items": _schema(items[0])} if items else {"type": "array"}
    if origin in (dict, Mapping):
        return {"type": "object"}
    if origin is Literal:
        kinds = {_SCALARS[type(a)] for a in args}
        return {"type": kinds.pop(), "enum": list(args)} if len(kinds) == 1 else {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _schema(options[0]) if len(options) == 1 else {"anyOf": [_schema(a) for a in options]}
    if hint is Any:
        return {}
    raise TypeError(f"unsupported tool parameter type {hint!r}")


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _docstring(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(first line, {parameter: description}) from a Google-style docstring."""
    lines = (inspect.getdoc(fn) or "").splitlines()
    params: dict[str, str] = {}
    indent, current, in_args = None, None, False
    for line in lines[1:]:
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if not in_args or not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break
        indent = indent or depth
        m = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line)
        if depth == indent and m:
            current = m.group(1)
            params[current] = m.group(2).strip()
        elif current:
            params[current] = f"{params[current]} {line.strip()}".strip()
    return (lines[0].strip() if lines else ""), params


def _json_type(value: Any) -> str:
    for kind, check in _CHECKS.items():
        if check(value):
            return kind
    return type(value).__name__


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _check(value: Any, schema: Mapping[str, Any]) -> str | None:
    """Why ``value`` does not fit ``schema``, or None (the subset our decorator writes)."""
    if "enum" in schema and value not in schema["enum"]:
        return f"must be one of {', '.join(map(json.dumps, schema['enum']))}"
    if "anyOf" in schema and all(_check(value, s) for s in schema["anyOf"]):
        return "has the wrong type"
    kind = schema.get("type")
    if isinstance(kind, str) and kind in _CHECKS and not _CHECKS[kind](value):
        return f"must be {kind}, not {_json_type(value)}"
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            problem = _check(item, schema["items"])
            if problem:
                return f"item {i} {problem}"
    return None


# -- the registry ---------------------------------------------------------------------------------
_REGISTRY: dict[str, Tool] = {}
_DISCOVERED: dict[str, Tool] | None = None


def register_tool(t: Tool | Callable[..., Any]) -> Tool:
    """Make a tool resolvable by name in this process (a plain function is decorated)."""
    t = t if isinstance(t, Tool) else tool(t)
    _REGISTRY[t.name] = t
    return t


def discover_tools(refresh: bool = False) -> dict[str, Tool]:
    """The tools installed packages declare in ``assist.tools`` (loaded once, then cached)."""
    global _DISCOVERED
    if _DISCOVERED is None or refresh:
        found: dict[str, Tool] = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                # The entry point's name is what specs say, so the model sees that name too.
                t = replace(obj, name=ep.name) if isinstance(obj, Tool) else tool(obj, name=ep.name)
            except Exception:  # a broken plugin must not take the strategies down
                logger.warning("skipping tool entry point %r (%s)", ep.name, ep.value, exc_info=True)
                continue
            if ep.name in _REGISTRY:
                logger.warning("tool entry point %r is shadowed by the built-in", ep.name)
            found[ep.name] = t
        _DISCOVERED = found
    return dict(_DISCOVERED)


def available_tools() -> dict[str, Tool]:
    """Every tool a spec may name: installed ones, then built-ins and registered (which win)."""
    return dict(sorted({**discover_tools(), **_REGISTRY}.items()))


def get_tool(name: str) -> Tool:
    if name in _REGISTRY:
        return _REGISTRY[name]
    found = discover_tools()
    if name in found:
        return found[name]
    raise UnknownTool(f"unknown tool {name!r} (available: {', '.join(available_tools())})")


# -- built-ins ------------------------------------------------------------------------------------
def _calculate(expression: str) -> str:
    try:
        return format_number(evaluate(expression))
    except CalculatorError as exc:
        raise ToolError(str(exc)) from None


_TRAINED: Any = CALCULATOR_TOOL["function"]
CALCULATOR = Tool(name="calculator", description=_TRAINED["description"],
                  parameters=copy.deepcopy(_TRAINED["parameters"]), fn=_calculate)


def format_run(result: SandboxResult) -> str:
    """A sandboxed run as the model reads it: stdout, then stderr and how it ended."""
    parts = [result.stdout.rstrip("\n")] if result.stdout.strip() else []
    if result.stderr.strip():
        parts.append("stderr:\n" + result.stderr.rstrip())
    if result.truncated:
        parts.append("[output truncated]")
    if result.timed_out:
        parts.append("error: timed out")
    elif result.killed_reason:
        parts.append(f"error: killed ({result.killed_reason})")
    elif result.returncode:
        parts.append(f"exit code {result.returncode}")
    return "\n".join(parts) or "(no output)"


def python_tool(*, timeout_s: float = 5.0, memory_mb: int = 256, max_output: int = 4000,
                name: str = "python") -> Tool:
    """A tool that runs a program in the sandbox; the built-in ``python`` uses the defaults."""

    async def run(code: str) -> str:
        result = await asyncio.to_thread(run_python, code, timeout_s=timeout_s,
                                         memory_mb=memory_mb, max_output=max_output)
        return format_run(result)

    return tool(run, name=name, description="Run a Python program and return what it prints.")


def retrieval_tool(search: Callable[[str, int], Awaitable[list[Passage]] | list[Passage]], *,
                   k: int = 3, name: str = "search",
                   description: str = "Search the knowledge base for passages about a query.") -> Tool:
    """A tool over any passage store: ``search(query, k)`` (sync or async) -> passages,
    returned as ``[id] text`` lines, the form :func:`assist.prompts.render_passages` uses."""

    async def run(query: str) -> str:
        if inspect.iscoroutinefunction(search):
            found = await search(query, k)
        else:  # a sync store may block (an index scan): keep it off the event loop
            found = await asyncio.to_thread(search, query, k)
            if inspect.isawaitable(found):
                found = await found
        return "\n".join(f"[{p.id}] {p.text}" for p in found) or "no passages found"

    return tool(run, name=name, description=description)


for _builtin in (CALCULATOR, python_tool()):
    register_tool(_builtin)
