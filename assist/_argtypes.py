"""Argument types and the standalone entry shared by the CLI's subcommand modules.

A bad value becomes argparse's one-line error naming the flag (``assist.cli._Parser``),
never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["float_at_least", "int_at_least", "standalone"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {raw!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def float_at_least(minimum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {raw!r}") from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {raw}")
        return value

    return parse


def standalone(add_parser: Callable[[Any], Any], argv: Sequence[str] | None, **defaults: Any) -> int:
    """Run one subcommand module on its own (``python -m assist._x_cli ...``), with the same
    parser ``assist.cli`` mounts."""
    from assist.cli import _Parser

    parser = _Parser(prog="assist")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser(sub)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    return int(args.func(args))
