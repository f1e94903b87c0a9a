"""The strategy spec grammar, shared by Python, the endpoint and the eval CLI.

::

    spec    := name ["@" K] [":" option ("," option)*] ["(" spec ")"]
    option  := key "=" value

``cot`` · ``sc@8`` (8 votes) · ``sc@8:t=0.7`` · ``bon@16`` · ``reflect@2`` ·
``sc@8(tools)`` (self-consistency over tool-using attempts) · ``reflect(rag)``.
Every strategy's factory takes ``k`` (from ``@K``), its options as keyword arguments, and
an ``inner`` strategy (from the parentheses) where it composes; ``budget=N`` caps the
tokens of the whole request. Strategies register themselves with :func:`register`.

A spec string carries text, so options that take a Python object (``bon:scorer``,
``rag:search``, ``reflect:critic``) are refused; they are set from Python. Options that
name a server resource (``bon:rm``, ``rag:store``, ``json:schema``) are paths when the
caller is trusted (``parse(spec)``); with a :class:`strategies._policy.Policy`
(``parse(spec, policy=...)``, what the endpoint does) they are *names* of resources the
operator loaded at start, and the spec is held to the policy's strategies and limits.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from assist.errors import BadRequest
from strategies._base import OptionError, need_int

__all__ = ["MAX_NESTING", "REGISTRY", "LimitError", "SpecError", "nesting", "parse", "register"]

REGISTRY: dict[str, Callable[..., Any]] = {}
_HEAD = re.compile(r"([a-z][a-z0-9_]*)(?:@(\d+))?(?::([^()]*))?")
MAX_NESTING = 64  # even a trusted caller's spec: deeper is a typo, and would exhaust the stack


class SpecError(BadRequest):
    """A malformed, unknown or refused strategy spec; the message names the bad part (an
    option as the user typed it: ``t`` in ``sc:t=-1``).

    ``param`` names the option (``temperature``, ``k``, ``rm``...) or the limit
    (:class:`LimitError`) at fault, where there is one; ``unknown`` is true when the
    strategy's name is not served (status 404, like a model; else 400). A ``ValueError``
    too, through :class:`assist.errors.BadRequest`.
    """

    def __init__(self, message: str, *, param: str | None = None, unknown: bool = False) -> None:
        super().__init__(message, param=param, code="strategy_not_found" if unknown else "invalid_strategy")
        self.unknown = unknown
        if unknown:
            self.status = 404


class LimitError(SpecError):
    """The spec (or the request running it) is over one of the policy's limits; ``param``
    is the limit's name (``max_depth``, ``max_k``, ``max_calls``, ``max_total_tokens``)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.code = "limit_exceeded"


@dataclass(frozen=True)
class _Entry:
    options: frozenset[str] | None  # what a spec may set; None: the factory's own parameters
    python_only: frozenset[str]  # options that take a Python object: never from a string
    resources: Mapping[str, str] = field(default_factory=dict)  # option -> resource kind


_INFO: dict[str, _Entry] = {}


def register(name: str, *, options: Iterable[str] | None = None, python_only: Iterable[str] = (),
             resources: Mapping[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a strategy factory under ``name``.

    ``options``: the keyword options a spec may set (default: the factory's parameters);
    ``python_only``: those that take an object and so cannot come from a spec string;
    ``resources``: options naming a server resource, by kind (``{"rm": "rm"}``): a path
    from a trusted caller, a resource's name under a policy.
    """

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY[name] = factory
        _INFO[name] = _Entry(None if options is None else frozenset(options), frozenset(python_only),
                             dict(resources or {}))
        return factory

    return deco


def _parameters(factory: Callable[..., Any]) -> frozenset[str]:
    if dataclasses.is_dataclass(factory):
        return frozenset(f.name for f in dataclasses.fields(factory) if f.init)
    params = inspect.signature(factory).parameters.values()
    return frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def _text_options(factory: Callable[..., Any]) -> frozenset[str]:
    """Options typed as text (``str``, ``str | ...``): their value stays the string written,
    so ``suffix=1.50`` or ``field=2`` is not read as a number."""
    if dataclasses.is_dataclass(factory):
        hints = {f.name: f.type for f in dataclasses.fields(factory)}
    else:
        hints = {p.name: p.annotation for p in inspect.signature(factory).parameters.values()}
    return frozenset(n for n, t in hints.items() if isinstance(t, str) and re.match(r"str\b", t))


def _value(raw: str) -> Any:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


# Short option names people type in model names; the factories take the long ones.
_ALIASES = {"t": "temperature", "b": "budget", "x": "extractor", "p": "top_p"}
_RESERVED = frozenset({"inner", "spec"})  # set by the grammar itself, never as key=value


class _Placeholder:
    """Stands in for a resource the policy lacks (any kind: a scorer, a store, a schema)
    while the strategy's other options are checked; never used."""

    json_schema: dict[str, Any] = {"type": "object"}  # noqa: RUF012 - read, never written
    name = "missing"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a missing resource was used")

    search = __call__


def nesting(spec: str) -> int:
    """How many strategies deep ``spec`` nests (``sc(reflect(cot))`` → 3), read off its
    parentheses without parsing it (so an absurd depth is refused before any recursion)."""
    depth = deepest = 0
    for ch in spec:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest + 1


def parse(spec: str, policy: Any = None) -> Any:
    """A strategy object from its spec, e.g. ``parse("sc@8:t=0.7(cot)")``.

    ``policy`` (a :class:`strategies._policy.Policy`, what the endpoint passes) restricts
    the strategies, swaps resource names for the resources it loaded, and enforces its
    limits on depth and ``k``; without one the caller is trusted (options may name paths).
    Raises :class:`SpecError` naming the bad part.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty strategy spec", param="strategy")
    text = spec.strip()
    if policy is not None:
        policy.check_text(text)
    elif nesting(text) > MAX_NESTING:
        raise LimitError(f"the spec nests {nesting(text)} strategies deep; at most {MAX_NESTING}",
                         param="max_depth")
    strategy, rest = _parse(text, text, policy)
    if rest:
        raise SpecError(f"unexpected {rest!r} at the end of {text!r}", param="strategy")
    return strategy


def _parse(text: str, whole: str, policy: Any) -> tuple[Any, str]:
    m = _HEAD.match(text)
    if m is None:
        raise SpecError(f"expected a strategy name at {text!r} in {whole!r}", param="strategy")
    name, k, opts = m.group(1), m.group(2), m.group(3)
    if name not in REGISTRY or (policy is not None and not policy.allows(name)):
        served = ", ".join(sorted(n for n in REGISTRY if policy is None or policy.allows(n)))
        if name in REGISTRY:
            raise SpecError(f"strategy {name!r} is not served here (served: {served})",
                            param="strategy", unknown=True)
        raise SpecError(f"unknown strategy {name!r} in {whole!r} (known: {served})",
                        param="strategy", unknown=True)
    factory = REGISTRY[name]
    entry = _INFO.get(name) or _Entry(None, frozenset())
    accepted = (entry.options if entry.options is not None else _parameters(factory)) - entry.python_only
    kwargs: dict[str, Any] = {}
    raw_values: dict[str, str] = {}
    typed: dict[str, str] = {}  # option -> as the user wrote it ("temperature" -> "t")
    if k is not None:
        if "k" not in accepted:
            raise SpecError(f"{name} takes no count (@{k})", param="k")
        if len(k) > 9:  # a count with ten digits is over any limit; int() of 5000 would raise
            raise SpecError(f"{name}@{k[:12]}...: the count is too large", param="k")
        kwargs["k"] = int(k)
    for item in (opts.split(",") if opts else []):
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not key or not raw:
            raise SpecError(f"option {item!r} in {whole!r} is not key=value", param="strategy")
        as_typed, key = key, _ALIASES.get(key, key)
        typed[key] = as_typed
        if key in entry.python_only:
            raise SpecError(f"{name}: option {as_typed!r} takes a Python object; it cannot be set from a "
                            "spec string (pass it from Python)", param=key)
        if key in _RESERVED or key not in accepted:
            known = ", ".join(sorted(accepted - {"inner"}))
            raise SpecError(f"{name}: unknown option {as_typed!r} (options: {known})", param=key)
        if key in kwargs:
            raise SpecError(f"{name}: option {as_typed!r} is given twice", param=key)
        kwargs[key] = raw if key in _text_options(factory) else _value(raw)
        raw_values[key] = raw
    if "k" in kwargs:
        try:
            need_int(kwargs["k"], "k", lo=1)
        except OptionError as exc:
            raise SpecError(f"{name}: {exc}", param="k") from None
        if policy is not None:
            policy.check_k(name, kwargs["k"])
    missing: SpecError | None = None  # raised once the other options are known to be fine
    for key, kind in entry.resources.items():
        if policy is not None:  # names of what the operator loaded; never a path
            try:
                kwargs[key] = policy.resource(kind, raw_values.get(key), strategy=name, option=key)
            except SpecError as exc:
                missing, kwargs[key] = exc, _Placeholder()
            if kwargs[key] is None:
                del kwargs[key]
        elif key in raw_values:
            kwargs[key] = raw_values[key]  # a path stays text: "store=2024" is no number
    rest = text[m.end():]
    if rest.startswith("("):
        if "inner" not in accepted:
            raise SpecError(f"{name} takes no inner strategy ({whole!r})", param="strategy")
        inner, rest = _parse(rest[1:], whole, policy)
        if not rest.startswith(")"):
            raise SpecError(f"missing ')' after the inner strategy in {whole!r}", param="strategy")
        kwargs["inner"] = inner
        rest = rest[1:]
    try:
        strategy = factory(**kwargs)
    except OptionError as exc:
        shown = typed.get(exc.option, exc.option)
        shown = exc.option if shown == exc.option else f"{shown} ({exc.option})"
        raise SpecError(f"{name}: {shown}: {exc.message}", param=exc.option) from exc
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{name}: {exc}", param="strategy") from exc
    if missing is not None:
        raise missing
    if policy is not None:
        policy.check_node(name, strategy)
    strategy.spec = text[: len(text) - len(rest)]
    return strategy, rest
