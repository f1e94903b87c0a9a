"""The ``assist`` command: ``assist train``, ``serve``, ``eval``, ``chat``, ``index`` and ``demo``.

User mistakes (a bad flag, a missing file, a run that exists) end in one clear line on
stderr and exit status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        self.exit(2, f"assist: error: {message}\n")


def _train(args: argparse.Namespace) -> int:
    # Imported here so `assist --help` stays instant.
    from training.config import STAGES, ConfigError, apply_overrides, preset
    from training.pipeline import RunError, run
    from training.progress import Reporter

    try:
        cfg = apply_overrides(preset(args.preset), args.set or [])
        if args.seed is not None:
            cfg.seed = args.seed
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(STAGES)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} exists and is not a folder")
        reporter = Reporter()
        ledger = run(cfg, out, stages, resume=args.resume, reporter=reporter)
    except (ConfigError, RunError) as exc:
        print(f"assist train: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("assist train: interrupted; finished stages and the last checkpoint are kept, "
              "continue with --resume", file=sys.stderr)
        return 130
    _print_summary(reporter, ledger, out)
    return 0


def _print_summary(reporter: object, ledger: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from training.card import summary_rows

    table = Table(title=f"assist train → {out}")
    for col in ("stage", "steps", "tokens", "wall s", "FLOPs", "last loss", "held-out"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in summary_rows(ledger):
        table.add_row(*row)
    Console().print(table)


def _serve(args: argparse.Namespace) -> int:
    from assist.errors import AssistError
    from assist.server import serve
    from assist.server._launch import config_from_args

    try:
        serve(config_from_args(args))
    except AssistError as exc:  # a bad flag, an unreachable upstream, a vLLM that would not start
        print(f"assist serve: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="assist", description="Train, serve and evaluate a small GPT assistant.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train the assistant through the four stages")
    t.add_argument("--preset", default="tiny", help="test | tiny | small (default: tiny)")
    t.add_argument("--out", required=True, help="run folder, e.g. runs/tiny")
    t.add_argument("--stages", help="comma-separated subset of tokenizer,pretrain,sft,rm,rl")
    t.add_argument("--resume", action="store_true", help="continue a run: finished stages are kept, a cut stage resumes from its checkpoint")
    t.add_argument("--seed", type=int, help="random seed (default: 0)")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set pretrain.steps=400 (repeatable)")
    t.set_defaults(func=_train)

    from assist.server._launch import add_serve_flags

    s = sub.add_parser("serve", help="serve a checkpoint or proxy a server behind an OpenAI-compatible API")
    add_serve_flags(s)
    s.set_defaults(func=_serve)

    from assist._index_cli import add_index_parser

    add_index_parser(sub)

    from assist._eval_cli import add_eval_parser

    add_eval_parser(sub)

    from assist._demo_cli import add_demo_parser

    add_demo_parser(sub)

    from assist._chat_cli import add_chat_parser

    add_chat_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
