"""``assist train``: the four stages of a run, resumable (see :mod:`training.pipeline`).

The top-level flags come from :class:`TrainFlags`; the run's own nested configuration
(:class:`training.config.RunConfig`) is set with ``--set section.field=value``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assist.cli._flags import add_flags, from_args, opt

__all__ = ["TrainFlags", "add_parser"]


@dataclass
class TrainFlags:
    out: str = opt(help="run folder, e.g. runs/tiny")
    preset: str = opt("tiny", "test | tiny | small")
    stages: str | None = opt(None, "comma-separated subset of tokenizer,pretrain,sft,scratch,rm,rl "
                                   "(default: all)")
    resume: bool = opt(False, "continue a run: finished stages are kept, a cut stage resumes "
                              "from its checkpoint")
    seed: int | None = opt(None, "random seed (default: the preset's, 0)")
    sequential: bool = opt(False, "every stage in this process, one after another (by default, on a "
                                  "CPU with 2+ threads, scratch trains in a second process beside rm and rl)")
    set: list[str] = opt(default_factory=list, metavar="SECTION.FIELD=VALUE",
                         help="override a config field, e.g. --set pretrain.steps=400 (repeatable)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    t = subparsers.add_parser("train", help="train the assistant through the four stages")
    add_flags(t, TrainFlags)
    t.set_defaults(func=_train)
    return t


def _train(args: argparse.Namespace) -> int:
    from training.config import STAGES, apply_overrides, preset
    from training.pipeline import RunError, run
    from training.progress import Reporter

    flags = from_args(TrainFlags, args)
    cfg = apply_overrides(preset(flags.preset), flags.set)
    if flags.seed is not None:
        cfg.seed = flags.seed
    stages = ([s.strip() for s in flags.stages.split(",") if s.strip()] if flags.stages
              else list(STAGES))
    out = Path(flags.out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a folder")
    reporter = Reporter()
    try:
        ledger = run(cfg, out, stages, resume=flags.resume, reporter=reporter,
                     overlap=not flags.sequential)
    except KeyboardInterrupt:
        print("assist train: interrupted; finished stages and the last checkpoint are kept, "
              "continue with --resume", file=sys.stderr)
        return 130
    _print_summary(ledger, out)
    return 0


def _print_summary(ledger: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from training.card import summary_rows

    table = Table(title=f"assist train → {out}")
    for col in ("stage", "steps", "tokens", "wall s", "FLOPs", "last loss", "held-out"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in summary_rows(ledger):
        table.add_row(*row)
    Console().print(table)
