"""The one flag generator (``assist.cli._flags``), every command's ``--help``, and the one
way to list a server's models (``assist._remote.list_models``)."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass

import pytest

from assist._remote import list_models
from assist.cli import COMMANDS, build_parser
from assist.cli._flags import Parser, add_flags, from_args, int_at_least, opt
from assist.errors import NotFound, UpstreamError


@dataclass
class _Example:
    out: str = opt(help="where to write")
    size: int = opt(8, "how many", type=int_at_least(1))
    mode: str = opt("a", "which one", choices=lambda: ("a", "b"))
    hosts: list[str] = opt(default_factory=list, help="names", split=True, metavar="HOSTS")
    name: str | None = opt(None, "a name (default: the first)")
    fast: bool = opt(False, "go fast")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="x")
    add_flags(parser, _Example)
    return parser


def test_fields_become_flags_and_back():
    args = _parser().parse_args(["--out", "o", "--hosts", "a, b", "--hosts", "c", "--fast"])
    assert from_args(_Example, args) == _Example(out="o", hosts=["a", "b", "c"], fast=True)
    assert from_args(_Example, _parser().parse_args(["--out", "o"])).hosts == []
    text = _parser().format_help()
    assert "how many (default: 8)" in text and "{a,b}" in text and "HOSTS" in text
    assert "(default: the first)" in text and text.count("(default:") == 3  # none for None/False


@pytest.mark.parametrize("argv", [[], ["--out", "o", "--size", "0"], ["--out", "o", "--mode", "c"]])
def test_bad_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("assist: error: ")


def _helps(parser: argparse.ArgumentParser) -> list[str]:
    """The help of a parser and of every subcommand below it."""
    out = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _helps(sub)
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_shows_its_defaults(command):
    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    helps = _helps(sub.choices[command])
    with_flags = [h for h in helps if "--" in h.replace("--help", "")]
    assert with_flags and all("default" in h for h in with_flags), command


def test_list_models_maps_failures_to_assist_errors():
    from fastapi import FastAPI

    from assist.testing import running_server

    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "m", "max_model_len": 64}]}

    with running_server(app) as url:
        assert list_models(url + "/v1") == list_models(url) == [{"id": "m", "max_model_len": 64}]
    with running_server(FastAPI()) as url, pytest.raises(NotFound):
        list_models(url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamError, match="cannot reach"):
        list_models(f"http://127.0.0.1:{port}", timeout=2)
