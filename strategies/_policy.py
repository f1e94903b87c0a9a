"""What a spec from an untrusted caller (an HTTP client) may ask of the server.

The operator names the resources at start, and each is loaded there, once::

    assist serve --model runs/tiny/rlhf --resource rm=runs/tiny/rm \\
        --resource store:kb=kb.sqlite --resource schema:answer=answer.json

``KIND[:NAME]=PATH``, KIND one of ``rm`` (a reward-model folder), ``store`` (a document
store, opened read-only: never created, converted or migrated) or ``schema`` (a JSON
schema file, read and checked); without ``:NAME`` the name is ``default``. Clients name
them (``bon:rm=default``, ``rag:store=kb``, ``json:schema=answer``); ``bon`` and ``rag``
without the option use the ``default`` one. No string from a client is opened as a path.

The policy also says which strategies are served (default: every registered one),
whether the ``python`` tool may run (default: no), and :class:`Limits` that a spec and a
request must stay within before any work starts: nesting depth, ``k``, and the worst-case
model calls and completion tokens (see :meth:`strategies._base.StrategyBase.bound`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assist.errors import BadRequest
from strategies._base import Bound, bound_of
from strategies._spec import REGISTRY, LimitError, SpecError, nesting

__all__ = ["KINDS", "Limits", "Policy", "PolicyError", "Schema", "parse_resource"]

KINDS = {"rm": "reward model", "store": "document store", "schema": "JSON schema"}
DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class PolicyError(BadRequest):
    """A bad ``--resource`` or policy setting, found at start (it may name paths: only the
    operator reads it)."""


@dataclass(frozen=True)
class Limits:
    """Per-request limits; each refusal is a 400 whose ``param`` is the field's name."""

    max_depth: int = 3  # strategies nested in one spec: sc(reflect(cot)) is 3
    max_k: int = 32  # any @K
    max_calls: int = 256  # worst-case model completions of one request (n x the strategy's)
    max_total_tokens: int = 65536  # worst-case completion tokens of one request
    max_spec_chars: int = 512  # the spec's length

    def __post_init__(self) -> None:
        for f in ("max_depth", "max_k", "max_calls", "max_total_tokens", "max_spec_chars"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PolicyError(f"{f} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class Schema:
    """A JSON schema loaded and checked once; ``json`` strategies share it."""

    name: str
    json_schema: dict[str, Any]
    validator: Any = field(repr=False)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> Schema:
        import jsonschema

        from strategies.json_output import read_schema

        path = Path(path)
        try:
            value = read_schema(path)
        except (OSError, ValueError) as exc:
            raise PolicyError(f"cannot read a JSON schema from {path}: {exc}") from exc
        if not isinstance(value, dict):
            raise PolicyError(f"{path}: a JSON schema is an object, not {type(value).__name__}")
        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            raise PolicyError(f"{path}: invalid JSON schema: {exc.message}") from exc
        return cls(name or path.stem, value, jsonschema.Draft202012Validator(value))


def parse_resource(text: str) -> tuple[str, str, str]:
    """``"store:kb=kb.sqlite"`` → ``("store", "kb", "kb.sqlite")``; ``"rm=DIR"`` →
    ``("rm", "default", "DIR")``."""
    head, eq, path = text.partition("=")
    kind, _, name = head.strip().partition(":")
    kind, name, path = kind.strip(), (name.strip() or DEFAULT), path.strip()
    if not eq or not path:
        raise PolicyError(f"--resource {text}: expected KIND[:NAME]=PATH, KIND one of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise PolicyError(f"--resource {text}: unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    if not _NAME.fullmatch(name):
        raise PolicyError(f"--resource {text}: a name is 1-64 letters, digits, '_', '-' or '.'")
    return kind, name, path


def _load(kind: str, name: str, path: str) -> Any:
    if kind == "schema":
        return Schema.load(path, name if name != DEFAULT else None)
    if kind == "store":
        from strategies._embed import EmbedderError
        from strategies._store import DocumentStore, StoreError

        try:
            store = DocumentStore(path, create=False, read_only=True)
        except StoreError as exc:
            raise PolicyError(f"--resource store:{name}: {exc}") from exc
        try:
            store.warm()  # the embedder and the vectors load now, not on the first request
        except (StoreError, EmbedderError, OSError) as exc:
            store.close()
            raise PolicyError(f"--resource store:{name}: {exc}") from exc
        return store
    from strategies._reward import RewardModel

    try:
        return RewardModel(path)
    except (OSError, ValueError) as exc:
        raise PolicyError(f"--resource rm:{name}: {exc}") from exc


class Policy:
    """The strategies, resources and limits the endpoint holds specs to.

    ``resources``: ``{kind: {name: loaded object}}`` (a RewardModel or any scorer for
    ``rm``, a DocumentStore for ``store``, a :class:`Schema` for ``schema``);
    :meth:`load` builds it from ``--resource`` strings. ``strategies``: the names served
    (None: every registered strategy). ``allow_python``: whether ``tools`` may use the
    ``python`` tool (sandboxed code execution).
    """

    def __init__(self, *, strategies: Iterable[str] | None = None, allow_python: bool = False,
                 limits: Limits | None = None,
                 resources: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.limits = limits or Limits()
        self.allow_python = bool(allow_python)
        self.strategies = None if strategies is None else frozenset(strategies)
        unknown = sorted((self.strategies or frozenset()) - set(REGISTRY))
        if unknown:
            raise PolicyError(f"unknown strategies {', '.join(unknown)} (known: {', '.join(sorted(REGISTRY))})")
        self.resources: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        for kind, named in (resources or {}).items():
            if kind not in KINDS:
                raise PolicyError(f"unknown resource kind {kind!r} (kinds: {', '.join(KINDS)})")
            self.resources[kind].update(named)

    @classmethod
    def load(cls, resources: Sequence[str] = (), **options: Any) -> Policy:
        """A policy over ``--resource`` strings, each loaded (read, opened, checked) now."""
        parsed = [parse_resource(text) for text in resources]
        seen: set[tuple[str, str]] = set()
        for kind, name, _ in parsed:
            if (kind, name) in seen:
                raise PolicyError(f"--resource {kind}:{name} is given twice")
            seen.add((kind, name))
        from strategies._toolbox import discover_tools

        discover_tools()  # installed tools are found now, not on the first request naming one
        loaded: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        try:
            for kind, name, path in parsed:
                loaded[kind][name] = _load(kind, name, path)
            return cls(resources=loaded, **options)
        except BaseException:
            _close_all(loaded)
            raise

    def close(self) -> None:
        """Close the stores it opened (the server calls this at shutdown)."""
        _close_all(self.resources)

    # -- what the parser asks ---------------------------------------------------------
    def allows(self, name: str) -> bool:
        return self.strategies is None or name in self.strategies

    def check_text(self, spec: str) -> None:
        """Length and nesting, read before the spec is parsed (no recursion first)."""
        if len(spec) > self.limits.max_spec_chars:
            raise LimitError(f"the strategy spec has {len(spec)} characters; this server takes at most "
                             f"{self.limits.max_spec_chars}", param="max_spec_chars")
        depth = nesting(spec)
        if depth > self.limits.max_depth:
            raise LimitError(f"the strategy spec nests {depth} strategies deep; this server allows "
                             f"{self.limits.max_depth}", param="max_depth")

    def check_k(self, strategy: str, k: int) -> None:
        if k > self.limits.max_k:
            raise LimitError(f"{strategy}@{k}: this server allows k up to {self.limits.max_k}", param="max_k")

    def resource(self, kind: str, name: str | None, *, strategy: str, option: str) -> Any:
        """The loaded resource a spec names (None when it names none and none is needed).
        The message of a refusal never repeats what the client wrote there."""
        named = self.resources[kind]
        what = KINDS[kind]
        if name is None:
            if DEFAULT in named:
                return named[DEFAULT]
            if kind == "schema":
                return None  # json without a schema: any JSON object
            raise SpecError(f"{strategy} needs a {what}, and this server has no default one "
                            f"({self._listing(kind)})", param=option)
        if name not in named:
            raise SpecError(f"{strategy}: {option}= takes the name of a {what} this server loaded, "
                            f"and that is not one ({self._listing(kind)})", param=option)
        return named[name]

    def _listing(self, kind: str) -> str:
        names = sorted(self.resources[kind])
        return f"names: {', '.join(names)}" if names else f"it has none; the operator adds them with --resource {kind}=PATH"

    def check_node(self, name: str, strategy: Any) -> None:
        """Refuse what the policy forbids in a built strategy (the python tool, say)."""
        tools = getattr(strategy, "_tools", None)
        if name == "tools" and isinstance(tools, Mapping) and "python" in tools and not self.allow_python:
            raise SpecError("tools: the python tool is off on this server (the operator enables it with "
                            "--allow-python)", param="use")

    # -- what the endpoint asks ---------------------------------------------------------
    def check_cost(self, strategy: Any, *, n: int = 1, max_tokens: int) -> Bound:
        """The worst case of ``n`` runs of ``strategy`` whose calls generate at most
        ``max_tokens`` each, checked against ``max_calls`` and ``max_total_tokens``."""
        bound = bound_of(strategy, max_tokens) * max(1, n)
        if bound.calls > self.limits.max_calls:
            raise LimitError(f"this request may make up to {bound.calls} model calls (n={n} x its strategy); "
                             f"this server allows {self.limits.max_calls}", param="max_calls")
        if bound.tokens > self.limits.max_total_tokens:
            raise LimitError(f"this request may generate up to {bound.tokens} tokens ({bound.calls} calls x "
                             f"max_tokens); this server allows {self.limits.max_total_tokens}: lower max_tokens, "
                             "n or the strategy's k", param="max_total_tokens")
        return bound


def _close_all(resources: Mapping[str, Mapping[str, Any]]) -> None:
    for named in resources.values():
        for obj in named.values():
            close = getattr(obj, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
