"""``assist eval``: score strategies on tasks, compare runs, list what exists, measure diversity.

::

    assist eval run --task arith --strategies direct,cot,sc@8 --model runs/tiny/rlhf
                    [--limit N] [--samples K] [--out DIR] [--resume] ...
    assist eval run --task facts --strategies direct,rag --base-url http://h:8000/v1
    assist eval --task arith ...          # the same: `run` is the default subcommand
    assist eval compare DIR1 DIR2 ...
    assist eval view DIR [DIR...] [--host H] [--port P] [--no-open]   # in the browser
    assist eval ls
    assist eval diversity --models runs/tiny/base,runs/tiny/sft,runs/tiny/rlhf [--prompts N]
                          [--k K] [--out DIR]

Flags of the shorthand form must come before any subcommand word; ``assist eval run -h``
lists them all. Every user mistake (a bad strategy, a missing task file, an unreachable
server, an ``--out`` another eval is writing to, a ``--resume`` with another task, model,
strategy set or seed than the run in ``--out``) ends in one line on stderr and exit status
2, before any model loads; Ctrl-C keeps the finished items (exit 130) and ``--resume``
continues. Runs that errored (the model or the server failed; not wrong answers) count as
wrong in the results, are listed in ``report.md`` and ``results.json`` (``errors``), and are
run again by ``--resume``; more than ``--max-error-rate`` of them (default 5%) makes the
run exit 3 once its results are written. The work is :func:`evals.run.run_eval` and
:func:`evals.diversity.measure_checkpoints`; this module parses, prints and picks the exit
status. ``assist.cli`` mounts it with :func:`add_parser`; ``python -m assist.cli.eval eval
...`` runs it alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assist.cli._flags import add_flags, from_args, opt, standalone

__all__ = ["add_parser", "main"]

ERRORS_EXIT = 3  # the run finished and wrote its results, but too many of its runs errored

TASKS = {
    "arith": "generated multi-step word problems (GSM8K format, `#### N`)",
    "facts": "questions about a fictional world; half of it is only in the rag store",
    "gsm8k": "grade-school math from --data-dir/test.jsonl",
    "PATH.jsonl": "your own: question/answer per line (--extractor, --on-bad-line)",
}


def _diversity_flags() -> type:
    """``assist eval diversity``'s flags: the measure's config, and which checkpoints."""
    from evals.diversity import DiversityConfig

    @dataclass
    class DiversityRun(DiversityConfig):
        models: str = opt("", "comma-separated checkpoint folders, e.g. "
                              "runs/tiny/base,runs/tiny/rlhf")
        out: str | None = opt(None, "output folder (default: runs/eval/diversity-<time>)")

    return DiversityRun


def _view_flags() -> type:
    """``assist eval view``'s flags: the run folders and where to serve them."""

    @dataclass
    class ViewConfig:
        dirs: list[str] = opt(default_factory=list, help="eval run folders (`assist eval run --out DIR`)",
                              positional=True, nargs="+", metavar="DIR")
        host: str = opt("127.0.0.1", "interface to listen on")
        port: int = opt(8001, "port to listen on")
        no_open: bool = opt(False, "do not open a browser on the page")

    return ViewConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` and its subcommands on ``assist``'s subparsers; each leaf sets
    ``func`` to a handler that takes the parsed args and returns an exit code."""
    from evals.run import EvalConfig

    ev = subparsers.add_parser("eval", help="score strategies on tasks, compare runs, diversity",
                               description="Score strategies on a task. `assist eval --task ...` "
                                           "is short for `assist eval run --task ...`.")
    add_flags(ev, EvalConfig, suppress=True)  # the shorthand; unset flags keep the defaults
    ev.set_defaults(func=_run)
    sub = ev.add_subparsers(dest="eval_command", metavar="{run,compare,view,ls,diversity}")
    r = sub.add_parser("run", help="evaluate strategies on a task (writes samples, results, report)")
    add_flags(r, EvalConfig)
    r.set_defaults(func=_run)
    c = sub.add_parser("compare", help="side-by-side accuracy of several eval folders")
    c.add_argument("dirs", nargs="+", metavar="DIR")
    c.set_defaults(func=_compare)
    v = sub.add_parser("view", help="browse eval runs in the browser: tables, plots, items, traces")
    add_flags(v, _view_flags())
    v.set_defaults(func=_view)
    ls = sub.add_parser("ls", help="list the tasks and strategies")
    ls.set_defaults(func=_ls)
    d = sub.add_parser("diversity", help="entropy and distinct-n of checkpoints' samples")
    add_flags(d, _diversity_flags())
    d.set_defaults(func=_diversity)
    return ev


def _fail(what: str, message: str) -> int:
    print(f"assist eval {what}: {message}", file=sys.stderr)
    return 2


# -- run -----------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from assist.errors import AssistError
    from evals.report import rich_table
    from evals.run import EvalConfig, default_out, run_eval

    cfg = from_args(EvalConfig, args)
    out = Path(cfg.out) if cfg.out else default_out(Path(cfg.task).stem)
    try:
        outcome = run_eval(cfg, out=out, console=Console(stderr=True))
    except AssistError as exc:  # a bad flag, task, strategy, server or --out: before any model
        return _fail("run", exc.message)
    except KeyboardInterrupt:
        print(f"assist eval run: interrupted; finished items are kept in {out}/samples.jsonl, "
              f"continue with --resume --out {out}", file=sys.stderr)
        return 130
    Console(width=max(160, Console().width)).print(rich_table(outcome.summary))  # 9 columns
    print(f"wrote {out}/samples.jsonl, results.json and report.md")
    errors = outcome.errors
    if not errors.errored_runs:
        return 0
    over = errors.rate > cfg.max_error_rate
    print(f"assist eval run: {errors.errored_runs} of {errors.runs} runs "
          f"({100 * errors.rate:.1f}%) errored, on {errors.errored_items} of {errors.items} "
          f"items, and count as wrong ({'above' if over else 'within'} --max-error-rate "
          f"{cfg.max_error_rate:g}); first error: {errors.examples[0]}; run them again with "
          f"--resume --out {out}", file=sys.stderr)
    return ERRORS_EXIT if over else 0


# -- compare, ls ---------------------------------------------------------------------------
def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from evals.report import compare

    try:
        table = compare(args.dirs)
    except (OSError, ValueError, KeyError) as exc:
        return _fail("compare", f"cannot read results ({type(exc).__name__}: {exc}); "
                                "give folders written by `assist eval run`")
    Console().print(table)
    return 0


def _view(args: argparse.Namespace) -> int:
    from assist.errors import AssistError
    from assist.server import serve_viewer

    cfg = from_args(_view_flags(), args)
    if not 0 < cfg.port < 65536:
        return _fail("view", f"--port {cfg.port}: not a port")
    try:
        serve_viewer(cfg.dirs, host=cfg.host, port=cfg.port, open_browser=not cfg.no_open)
    except AssistError as exc:  # a folder that is not an eval run: before anything listens
        return _fail("view", exc.message)
    except KeyboardInterrupt:
        pass
    return 0


def _first_line(text: str | None) -> str:
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def _ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    import strategies

    console = Console()
    tasks = Table(title="tasks (--task)")
    tasks.add_column("task")
    tasks.add_column("what")
    for name, what in TASKS.items():
        tasks.add_row(name, what)
    console.print(tasks)
    table = Table(title=escape("strategies (--strategies, spec: name[@K][:key=value,...][(inner)])"))
    table.add_column("name")
    table.add_column("what")
    for name, factory in sorted(strategies.REGISTRY.items()):
        doc = sys.modules[factory.__module__].__doc__
        table.add_row(name, escape(_first_line(doc).replace("``", "")))
    console.print(table)
    console.print("examples: " + "  ".join(strategies.EXAMPLES))
    return 0


# -- diversity -----------------------------------------------------------------------------
def _diversity(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from assist.errors import AssistError
    from evals.diversity import DiversityConfig, measure_checkpoints
    from evals.run import default_out

    flags = from_args(_diversity_flags(), args)
    cfg = DiversityConfig(**{f.name: getattr(flags, f.name)
                             for f in dataclasses.fields(DiversityConfig)})
    paths = [Path(p.strip()) for p in flags.models.split(",") if p.strip()]
    out = Path(flags.out) if flags.out else default_out("diversity")
    try:
        rows = measure_checkpoints(paths, cfg, out)
    except AssistError as exc:
        return _fail("diversity", exc.message)
    table = Table(title=f"diversity: {cfg.k} samples x {cfg.prompts} arith prompts, "
                        f"T={cfg.temperature}")
    for col in ("model", "entropy", "distinct_1", "distinct_2", "distinct_3", "mean_length"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("model", "entropy", "distinct_1", "distinct_2",
                                            "distinct_3", "mean_length")))
    Console().print(table)
    print(f"wrote {out}/diversity.json and diversity.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``assist eval ...`` on its own (the same parser ``assist.cli`` mounts)."""
    return standalone(add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
