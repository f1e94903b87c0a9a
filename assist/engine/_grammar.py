"""Constrained decoding with xgrammar: JSON modes and forced tool calls, enforced token by token.

A request's ``response_format`` or forcing ``tool_choice`` compiles (once per distinct spec,
kept in an LRU) into a :class:`Grammar`; every sequence of the request gets its own
:class:`_Matcher`, which the scheduler asks to mask the logits before each sample and then
feeds the chosen token. End-of-sequence is allowed only where the grammar is complete, so a
finished output always parses; one cut by ``max_tokens`` ends with ``finish_reason="length"``.

Forced tool calls are constrained to the exact Hermes text the chat template renders
(:func:`assist.chat_format.tool_call_text`), so they come back through the same parser as
free ones.

Compiling costs grow steeply with a schema's nesting and size (measured on 2 cores: 200
nested objects 1.9 s, 2,000 properties 19 s), so a schema deeper than ``max_depth`` or longer
than ``max_bytes`` is refused at once with a 400 naming the limit, and a compile runs on the
cache's own worker threads with a ``timeout``: a caller never waits longer, and the caller's
thread (an event loop's, say) is never the one compiling.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from assist._signals import quiet_thread
from assist.chat_format import TOOL_CALL_END, TOOL_CALL_START
from assist.errors import BadRequest

__all__ = ["COMPILE_TIMEOUT_S", "MAX_SCHEMA_BYTES", "MAX_SCHEMA_DEPTH", "Grammar", "GrammarCache", "ToolPlan",
           "check_forced", "check_schema", "forced_calls", "parse_calls", "plan_tools"]

# Whitespace-free JSON, as the chat template's `tojson` writes it, keeps a tiny model from
# wandering into endless blanks; strict mode (no properties beyond the schema's) keeps outputs
# a subset of what the schema allows, so they still validate.
_JSON_STYLE: dict[str, Any] = {"any_whitespace": False, "strict_mode": True}

# Bounds on what a request may ask to compile (see the module docstring).
MAX_SCHEMA_DEPTH = 64  # nested objects/arrays of the schema document: 32 nested objects (OpenAI allows 10)
MAX_SCHEMA_BYTES = 16 * 1024  # the schema as compact JSON
COMPILE_TIMEOUT_S = 5.0


def check_schema(schema: Any, param: str, *, max_depth: int = MAX_SCHEMA_DEPTH,
                 max_bytes: int = MAX_SCHEMA_BYTES) -> str:
    """The schema as canonical JSON text, or a :class:`BadRequest` naming the limit it exceeds.

    Walks iteratively, so no nesting can exhaust the stack; the depth is checked before the
    schema is serialized (which recurses).
    """
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > max_depth:
            raise BadRequest(f"the {param} JSON schema nests deeper than {max_depth} levels "
                             f"(max_schema_depth={max_depth})", param=param)
        stack.extend((child, depth + 1) for child in children)
    try:
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"the {param} JSON schema is not JSON: {exc}", param=param) from exc
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise BadRequest(f"the {param} JSON schema is {size} bytes; the limit is {max_bytes} "
                         f"(max_schema_bytes={max_bytes})", param=param)
    return text


class _Matcher:
    """One sequence's position in the grammar (the scheduler's ``Constraint``)."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)

    def mask_(self, logits: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits.view(1, -1)
        bitmask = self.bitmask.to(logits.device)
        # Plain torch off the CPU: one row per call gains nothing from the Triton kernel, which
        # a CUDA install may lack.
        backend = "cpu" if logits.device.type == "cpu" else "torch_native"
        xgr.apply_token_bitmask_inplace(row, bitmask, vocab_size=self.grammar.vocab_size, backend=backend)
        banned = self.grammar.banned.to(logits.device)
        kept = row[0, banned]
        row[0, banned] = float("-inf")
        if not torch.isfinite(row).any():  # only a banned marker fits: let the grammar have it
            row[0, banned] = kept

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar plus the special tokens it must never emit (turn markers etc.).

    xgrammar sees our special tokens as plain text (``<|im_start|>`` would do as a JSON
    string's content), so the tokens the output must not contain are masked on top.
    """

    compiled: xgr.CompiledGrammar
    vocab_size: int
    banned: torch.Tensor  # token ids, int64

    def new(self) -> _Matcher:
        return _Matcher(self)


@dataclass(frozen=True)
class ToolPlan:
    """What a request's ``tools``/``tool_choice`` mean for the prompt, the output and parsing."""

    prompt_tools: list[dict[str, Any]] | None  # rendered into the system prompt
    parse: bool  # read Hermes tool calls out of the text
    forced: tuple[dict[str, Any], ...] = ()  # the functions the output must call
    multiple: bool = True  # "required" allows several calls; a named function gets one


def _functions(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{i}] needs a function with a name", param="tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        out.append(dict(fn))
    return out


def plan_tools(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any) -> ToolPlan:
    """OpenAI's ``tool_choice``: "none", "auto" (the default with tools), "required", or a
    named function ``{"type": "function", "function": {"name": ...}}``."""
    if not tools:
        if tool_choice in (None, "none", "auto"):
            return ToolPlan(None, False)
        raise BadRequest("tool_choice needs tools", param="tool_choice")
    functions = _functions(tools)
    prompt_tools = [dict(t) for t in tools]
    if tool_choice in (None, "auto"):
        return ToolPlan(prompt_tools, True)
    if tool_choice == "none":
        return ToolPlan(None, False)
    if tool_choice == "required":
        return ToolPlan(prompt_tools, True, tuple(functions), True)
    name = None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type", "function") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise BadRequest('tool_choice must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    chosen = [f for f in functions if f["name"] == name]
    if not chosen:
        raise BadRequest(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return ToolPlan(prompt_tools, True, (chosen[0],), False)


def _call_format(fn: Mapping[str, Any]) -> dict[str, Any]:
    """One call, byte for byte as ``tool_call_text`` writes it, arguments per the tool's schema."""
    schema = fn.get("parameters") or {"type": "object", "properties": {}}
    args = str(xgr.Grammar.from_json_schema(json.dumps(schema), **_JSON_STYLE))
    tail = f', "name": {json.dumps(fn["name"], ensure_ascii=False)}}}\n{TOOL_CALL_END}'
    return {"type": "sequence", "elements": [
        {"type": "const_string", "value": f'{TOOL_CALL_START}\n{{"arguments": '},
        {"type": "grammar", "grammar": args},
        {"type": "const_string", "value": tail},
    ]}


def check_forced(plan: ToolPlan, *, max_depth: int = MAX_SCHEMA_DEPTH, max_bytes: int = MAX_SCHEMA_BYTES) -> str:
    """The forced functions' names and schemas as compact JSON, or a 400 if they pass the bounds."""
    spec = [[f["name"], f.get("parameters")] for f in plan.forced]
    return check_schema(spec, "tools", max_depth=max_depth + 2, max_bytes=max_bytes)


def forced_calls(plan: ToolPlan) -> dict[str, Any]:
    """The structural-tag format (xgrammar's, which vLLM's ``response_format`` also takes) of a
    forced answer: one call to a forced function, or one or more for "required". Bound the
    tools' schemas (:func:`check_forced`) before: this reads them into grammars."""
    calls = {"type": "or", "elements": [_call_format(f) for f in plan.forced]}
    return {"type": "plus", "content": calls} if plan.multiple else calls


_DECODER = json.JSONDecoder()


def parse_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split text into (content, Hermes tool calls), like :func:`assist.chat_format.parse_tool_calls`
    but reading each call with a JSON decoder, so a ``</tool_call>`` inside an argument string
    (which grammars allow: it is valid JSON) does not cut the call short."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = search = 0
    while (start := text.find(TOOL_CALL_START, search)) >= 0:
        search = start + len(TOOL_CALL_START)
        body = len(text) - len(text[search:].lstrip())
        try:
            obj, end = _DECODER.raw_decode(text, body)
        except ValueError:
            continue
        close = len(text) - len(text[end:].lstrip())
        if not text.startswith(TOOL_CALL_END, close) or not isinstance(obj, dict) \
                or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", {})
        calls.append({"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)})
        kept.append(text[pos:start])
        pos = search = close + len(TOOL_CALL_END)
    kept.append(text[pos:])
    return ("".join(kept).strip(), calls) if calls else (text, [])


class GrammarCache:
    """Compiles grammars against one tokenizer; an LRU spares recompiling repeated specs."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int], *, size: int = 64,
                 threads: int = 1, workers: int = 2, timeout: float = COMPILE_TIMEOUT_S,
                 max_depth: int = MAX_SCHEMA_DEPTH, max_bytes: int = MAX_SCHEMA_BYTES) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_ids))
        # Our LRU is the cache: xgrammar's own would grow without bound with distinct schemas.
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.timeout, self.max_depth, self.max_bytes = timeout, max_depth, max_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="assist-grammar",
                                                           initializer=quiet_thread)
        self._inflight: dict[str, concurrent.futures.Future[Grammar]] = {}
        self.vocab_size = vocab_size
        specials = {int(i) for i in tokenizer.all_special_ids if i is not None and i < vocab_size}
        specials -= set(stop_ids)
        markers = {tokenizer.convert_tokens_to_ids(t) for t in (TOOL_CALL_START, TOOL_CALL_END)}
        self._banned = torch.tensor(sorted(specials), dtype=torch.long)
        self._banned_but_tools = torch.tensor(sorted(specials - markers), dtype=torch.long)
        self.size = size
        self._lru: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, key: str, compile_: Callable[[], xgr.CompiledGrammar], banned: torch.Tensor,
             param: str) -> Grammar:
        """The cached grammar, or one compiled on a worker within ``timeout`` seconds; the same
        spec asked for again while it compiles waits for that compile."""
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return self._lru[key]
            future = self._inflight.get(key)
            if future is None:
                future = self._inflight[key] = self._pool.submit(self._compile, key, compile_, banned)
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise BadRequest(f"compiling the {param} grammar took over {self.timeout:g}s "
                             f"(grammar_timeout={self.timeout:g}); simplify it", param=param) from None
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's schema/JSON errors
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise BadRequest(f"cannot compile the {param} grammar: {detail}", param=param) from exc

    def _compile(self, key: str, compile_: Callable[[], xgr.CompiledGrammar], banned: torch.Tensor) -> Grammar:
        try:
            grammar = Grammar(compile_(), self.vocab_size, banned)
        finally:
            with self._lock:
                self._inflight.pop(key, None)
        with self._lock:  # kept even when its caller gave up waiting: a retry finds it
            self._lru[key] = grammar
            while len(self._lru) > self.size:
                self._lru.popitem(last=False)
        return grammar

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def response_format(self, response_format: Mapping[str, Any] | None) -> Grammar | None:
        """``{"type": "text" | "json_object" | "json_schema", ...}`` as OpenAI defines it."""
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, Mapping) else None
        if kind == "text":
            return None
        if kind == "json_object":
            # Any object, but written compactly (the built-in JSON grammar allows unbounded
            # whitespace, which a small model can loop in until max_tokens).
            def any_object() -> xgr.CompiledGrammar:
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                         strict_mode=False)

            return self._get("json_object", any_object, self._banned, "response_format")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping):
                raise BadRequest('response_format.json_schema must be {"name": ..., "schema": {...}}',
                                 param="response_format")
            schema = spec.get("schema", {"type": "object"})
            if not isinstance(schema, Mapping | bool):
                raise BadRequest("response_format.json_schema.schema must be a JSON schema object",
                                 param="response_format")
            text = check_schema(schema, "response_format", max_depth=self.max_depth, max_bytes=self.max_bytes)
            return self._get("schema:" + text, lambda: self.compiler.compile_json_schema(text, **_JSON_STYLE),
                             self._banned, "response_format")
        raise BadRequest(f"response_format.type must be text, json_object or json_schema, not {kind!r}",
                         param="response_format")

    def tool_calls(self, plan: ToolPlan) -> Grammar | None:
        """The grammar of a forced answer: Hermes tool calls only (one, or one or more)."""
        if not plan.forced:
            return None

        def compile_() -> xgr.CompiledGrammar:
            return self.compiler.compile_structural_tag({"type": "structural_tag", "format": forced_calls(plan)})

        key = f"tools:{plan.multiple}:" + check_forced(plan, max_depth=self.max_depth, max_bytes=self.max_bytes)
        return self._get(key, compile_, self._banned_but_tools, "tools")
