"""The one generator of command-line flags: typed dataclass configs in, argparse flags out.

Every command's flags come from a dataclass (``EvalConfig``, ``ServeConfig``, the demo's,
chat's and index's configs below them): a field's name is its flag (``max_tokens`` →
``--max-tokens``), its annotation the type, its default the default ``--help`` shows, and
its ``metadata`` the rest. The metadata is plain dict keys, so a config in the core or in
``evals`` needs no import of this module (:func:`opt` only spells them):

- ``help``: the help text (or a zero-argument callable returning it); ``(default: X)`` is added unless the text already says "default"
  or the default is None, False or empty;
- ``choices``: the allowed values (a tuple, or a zero-argument callable called when the
  parser is built, so a constant is imported from where it lives only when its command is);
- ``metavar``; ``type``: a converter replacing the annotation's (``int_at_least(1)``);
- a ``list[...]`` field is a flag given several times (``action="append"``); with
  ``split`` each value is also split at commas (``--upstream a,b --upstream c``);
- ``flags``: the option strings, when not only ``--field-name`` (``("-k",)``);
- ``positional`` (with ``nargs``): an argument, not a flag;
- ``exclusive``: the name of a mutually exclusive group (``required_group`` makes one of
  the group required);
- ``cli``: False keeps a field out of the command line (set from Python only);
- ``env``: an environment variable read when the flag is not given (``--help`` names it; a
  given flag wins); with ``env_unless`` (field names) it is not read when one of those has
  a value (``OPENAI_BASE_URL`` gives way to ``--model``), with ``env_needs`` only when all
  of those have one (``OPENAI_API_KEY`` only with a base URL). An empty variable counts as
  unset, except with ``env_empty``, where it is the value (so an empty ``ASSIST_API_KEY``
  is refused as an empty ``--api-key`` is, not taken for no key).

:func:`add_flags` adds the flags of a config to a parser; :func:`from_args` builds the config
back from the parsed namespace. A bad value becomes argparse's one-line error naming the
flag (:class:`Parser`), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["Parser", "add_flags", "env_value", "float_at_least", "from_args", "int_at_least",
           "opt", "standalone"]

C = TypeVar("C")
_MISSING: Any = dataclasses.MISSING


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (not the usage block) and defaults in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"assist: error: {message}\n")


def opt(default: Any = _MISSING, help: str = "", *, default_factory: Any = _MISSING,
        **metadata: Any) -> Any:
    """A dataclass field with the flag metadata above: ``opt(8, "runs in flight")``."""
    meta = {"help": help, **metadata}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _at_least(kind: Callable[[str], Any], minimum: Any, expected: str,
              below: str) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, not {raw!r}") from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(below.format(minimum=minimum, value=value, raw=raw))
        return value

    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number, at least ``minimum``."""
    return _at_least(int, minimum, "a whole number", "must be at least {minimum}, not {value}")


def float_at_least(minimum: float) -> Callable[[str], float]:
    """An argparse ``type``: a number (not nan), at least ``minimum``."""
    return _at_least(float, minimum, "a number", "must be >= {minimum}, not {raw}")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` → (int, False); ``list[str]`` → (str, True); ``bool`` → (bool, False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) in (list, tuple):
        return (typing.get_args(annotation) or (str,))[0], True
    return annotation, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _help(text: str, default: Any) -> str:
    if default is _MISSING or default is None or default is False or default in ([], (), ""):
        return text
    if "default" in text.lower():
        return text
    shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
    return f"{text} (default: {str(shown).replace('%', '%%')})".strip()


def _env_help(text: str, meta: Any) -> str:
    return f"{text} (env: {meta['env']})".strip() if meta.get("env") else text


def env_value(meta: Any) -> str | None:
    """The value of the field's ``env`` variable (None: not named, unset, or empty without
    ``env_empty``)."""
    name = meta.get("env")
    value = os.environ.get(name) if name else None
    if value is None or (not value.strip() and not meta.get("env_empty")):
        return None
    return value


def add_flags(parser: argparse.ArgumentParser, cls: type, *, suppress: bool = False) -> None:
    """One flag (or argument) per field of the dataclass ``cls``. ``suppress`` leaves unset
    flags out of the namespace (for a parent parser whose subcommand declares the same)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        kind, many = _base_type(hints[f.name])
        default = _default(f)
        text = meta.get("help", "")
        kw: dict[str, Any] = {"help": _env_help(_help(text() if callable(text) else text, default),
                                                meta)}
        choices = meta.get("choices")
        if callable(choices):
            choices = tuple(choices())
        if choices:
            kw["choices"] = choices
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if meta.get("positional"):
            if meta.get("nargs"):
                kw["nargs"] = meta["nargs"]
            parser.add_argument(f.name, type=meta.get("type", kind), **kw)
            continue
        kw["dest"] = f.name
        if suppress:
            kw["default"] = argparse.SUPPRESS
        elif default is not _MISSING:
            kw["default"] = None if many else default
        else:
            kw["required"] = True
        target: Any = parser
        if meta.get("exclusive"):
            name = meta["exclusive"]
            if name not in groups:  # a group one of whose variables is set is not required
                required = bool(meta.get("required_group")) and not any(
                    env_value(g.metadata) is not None for g in dataclasses.fields(cls)
                    if g.metadata.get("exclusive") == name)
                groups[name] = parser.add_mutually_exclusive_group(required=required)
            target = groups[name]
        names = list(meta.get("flags") or ("--" + f.name.replace("_", "-"),))
        if kind is bool and not many:
            kw.pop("choices", None)
            target.add_argument(*names, action="store_true", **kw)
            continue
        if many:  # a list: repeat the flag (and, with ``split``, comma-separate)
            kw["action"] = "append"
        target.add_argument(*names, type=meta.get("type", kind), **kw)


def from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """The config named by parsed flags; fields without a value keep their default, list
    fields from repeated and comma-split flags are flattened."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        _, many = _base_type(hints[f.name])
        if many:
            items = value if isinstance(value, list) else ([] if value is None else [value])
            if f.metadata.get("split"):
                items = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
            value = items
        values[f.name] = value
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = f.metadata
        if values.get(f.name) is not None or (env := env_value(meta)) is None:
            continue  # a given flag wins
        if any(values.get(n) for n in meta.get("env_unless", ())):
            continue
        if not all(values.get(n) for n in meta.get("env_needs", ())):
            continue
        values[f.name] = env
    values.update(overrides)
    return cls(**values)


def standalone(add_parser: Callable[[Any], Any], argv: Sequence[str] | None,
               **defaults: Any) -> int:
    """Run one command module on its own (``python -m assist.cli.index index ...``), with the
    same parser ``assist.cli`` mounts."""
    from assist.cli import add_common_flags, run_parsed

    parser = Parser(prog="assist")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_parser(sub)
    add_common_flags(parser)
    if defaults:
        parser.set_defaults(**defaults)
    return run_parsed(parser.parse_args(argv))
