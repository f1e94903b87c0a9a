"""The ``assist`` command: ``assist train``, ``serve``, ``eval``, ``chat``, ``index`` and ``demo``.

One module per command in this package (:mod:`assist.cli.train`, ``serve``, ``eval``,
``chat``, ``index``, ``demo``), each with ``add_parser(subparsers)``; their flags come from
typed configs through :mod:`assist.cli._flags`. The front doors may import anything; nothing
imports them. Only the command being run has its parser built in full (and its imports
made), so ``assist --help`` stays fast without copying constants from the layers below.

User mistakes (a bad flag, a missing file, a run that exists) end in one clear line on
stderr and exit status 2; they never print a traceback. Every error the project raises on
purpose is an :class:`assist.errors.AssistError`: :func:`run_parsed` catches that one base
class, prints its message and exits with its ``exit_status``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from assist.cli._flags import Parser
from assist.errors import AssistError

__all__ = ["build_parser", "main", "run_parsed"]

# command -> (module, one line for `assist --help`)
COMMANDS = {
    "train": ("assist.cli.train", "train the assistant through the four stages"),
    "serve": ("assist.cli.serve",
              "serve a checkpoint or proxy a server behind an OpenAI-compatible API"),
    "index": ("assist.cli.index", "build and query the rag strategy's document store"),
    "eval": ("assist.cli.eval", "score strategies on tasks, compare runs, diversity"),
    "demo": ("assist.cli.demo",
             "evaluate a trained run and write RUN/REPORT.md (the main job's second half)"),
    "chat": ("assist.cli.chat", "chat in the terminal with a checkpoint or a server"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``assist`` parser; with ``command``, only that command's parser is built in full
    (the others are listed by name and help line)."""
    parser = Parser(prog="assist", description="Train, serve and evaluate a small GPT assistant.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (module, help_line) in COMMANDS.items():
        if command is None or command == name:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_line)
    return parser


def _prefix(args: argparse.Namespace) -> str:
    words = [getattr(args, "command", None), getattr(args, "eval_command", None),
             getattr(args, "index_command", None)]
    return "assist " + " ".join(w for w in words if w)


def run_parsed(args: argparse.Namespace) -> int:
    """Run the handler the parsed ``args`` name; a user mistake is one line and exit 2."""
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except AssistError as exc:  # every error of the project that a user can act on
        print(f"{_prefix(args)}: {exc.message}", file=sys.stderr)
        return exc.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    # Only the command named is built in full ("" builds none: `assist --help` lists them).
    return run_parsed(build_parser(command if command in COMMANDS else "").parse_args(argv))
