"""The strategy spec grammar, shared by Python, the endpoint and the eval CLI.

::

    spec    := name ["@" K] [":" option ("," option)*] ["(" spec ")"]
    option  := key "=" value

``cot`` · ``sc@8`` (8 votes) · ``sc@8:t=0.7`` · ``bon@16`` · ``reflect@2`` ·
``sc@8(tools)`` (self-consistency over tool-using attempts) · ``reflect(rag)``.
Every strategy's factory takes ``k`` (from ``@K``), its options as keyword arguments, and
an ``inner`` strategy (from the parentheses) where it composes; ``budget=N`` caps the
tokens of the whole request. Strategies register themselves with :func:`register`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["REGISTRY", "SpecError", "parse", "register"]

REGISTRY: dict[str, Callable[..., Any]] = {}
_HEAD = re.compile(r"([a-z][a-z0-9_]*)(?:@(\d+))?(?::([^()]*))?")


class SpecError(ValueError):
    """A malformed or unknown strategy spec; the message names the bad part."""


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY[name] = factory
        return factory

    return deco


def _value(raw: str) -> Any:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


# Short option names people type in model names; the factories take the long ones.
_ALIASES = {"t": "temperature", "b": "budget", "x": "extractor", "p": "top_p"}


def parse(spec: str) -> Any:
    """A strategy object from its spec, e.g. ``parse("sc@8:t=0.7(cot)")``."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty strategy spec")
    strategy, rest = _parse(spec.strip(), spec)
    if rest:
        raise SpecError(f"unexpected {rest!r} at the end of {spec!r}")
    return strategy


def _parse(text: str, whole: str) -> tuple[Any, str]:
    m = _HEAD.match(text)
    if m is None:
        raise SpecError(f"expected a strategy name at {text!r} in {whole!r}")
    name, k, opts = m.group(1), m.group(2), m.group(3)
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise SpecError(f"unknown strategy {name!r} in {whole!r} (known: {known})")
    kwargs: dict[str, Any] = {}
    if k is not None:
        if int(k) < 1:
            raise SpecError(f"{name}@{k}: the count must be at least 1")
        kwargs["k"] = int(k)
    for item in (opts.split(",") if opts else []):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip() or not raw.strip():
            raise SpecError(f"option {item!r} in {whole!r} is not key=value")
        kwargs[_ALIASES.get(key.strip(), key.strip())] = _value(raw.strip())
    rest = text[m.end():]
    if rest.startswith("("):
        inner, rest = _parse(rest[1:], whole)
        if not rest.startswith(")"):
            raise SpecError(f"missing ')' after the inner strategy in {whole!r}")
        kwargs["inner"] = inner
        rest = rest[1:]
    try:
        strategy = REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise SpecError(f"{name}: {exc}") from exc
    strategy.spec = text[: len(text) - len(rest)]
    return strategy, rest
