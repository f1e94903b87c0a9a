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

Every command (and ``assist`` itself) takes ``--version`` (the installed package's version)
and ``--log-level`` (debug, info, warning, error; default info). :func:`run_parsed` sets up
logging for the command it runs, here and nowhere else: one stderr handler on the root
logger, at that level (``assist serve`` hands the same level to uvicorn). At info, the HTTP
clients' one line per request (httpx, httpcore) stays quiet; ``debug`` shows everything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence

from assist.cli._flags import Parser
from assist.errors import AssistError

__all__ = ["LOG_LEVELS", "add_common_flags", "build_parser", "logging_to_stderr", "main",
           "run_parsed", "version"]

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
# Libraries that log a line per HTTP request at INFO: shown only at --log-level debug.
_CHATTY = ("httpx", "httpcore")

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


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("assist")
    except PackageNotFoundError:
        from assist import __version__

        return __version__


def add_common_flags(parser: argparse.ArgumentParser, *, top: bool = True) -> None:
    """``--version`` and ``--log-level`` on ``parser`` and on every subcommand below it; below
    the top an unset ``--log-level`` leaves the namespace alone (the top's default stands)."""
    parser.add_argument("--version", action="version", version=f"assist {version()}",
                        help="print the version and exit")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        default=DEFAULT_LOG_LEVEL if top else argparse.SUPPRESS,
                        help=f"logging level (default: {DEFAULT_LOG_LEVEL})")
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                add_common_flags(child, top=False)


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
    add_common_flags(parser)
    return parser


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the ``sys.stderr`` of the moment (a test's capture, a redirect), not to the
    one it was created with."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


@contextlib.contextmanager
def logging_to_stderr(level: str = DEFAULT_LOG_LEVEL) -> Iterator[None]:
    """The logging of one command: a stderr handler on the root logger at ``level`` for as
    long as it runs; then the loggers are as they were (a test runs many commands in one
    process)."""
    root = logging.getLogger()
    number = getattr(logging, level.upper())
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = [(root, root.level)] + [(logging.getLogger(n), logging.getLogger(n).level) for n in _CHATTY]
    root.addHandler(handler)
    root.setLevel(number)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(number if number <= logging.DEBUG else max(number, logging.WARNING))
    try:
        yield
    finally:
        root.removeHandler(handler)
        for logger, old in saved:
            logger.setLevel(old)


def _prefix(args: argparse.Namespace) -> str:
    words = [getattr(args, "command", None), getattr(args, "eval_command", None),
             getattr(args, "index_command", None)]
    return "assist " + " ".join(w for w in words if w)


def run_parsed(args: argparse.Namespace) -> int:
    """Run the handler the parsed ``args`` name; a user mistake is one line and exit 2."""
    try:
        with logging_to_stderr(getattr(args, "log_level", None) or DEFAULT_LOG_LEVEL):
            return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except AssistError as exc:  # every error of the project that a user can act on
        print(f"{_prefix(args)}: {exc.message}", file=sys.stderr)
        return exc.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The first command name (only `--log-level LEVEL` may come before it).
    command = next((a for a in argv if a in COMMANDS), None)
    # Only the command named is built in full ("" builds none: `assist --help` lists them).
    return run_parsed(build_parser(command or "").parse_args(argv))
