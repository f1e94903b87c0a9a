"""``assist demo``: the main job's second half — evaluate a trained run and tell its story.

After ``assist train --preset tiny --out runs/tiny`` this evaluates every strategy on
held-out ``arith`` (the RLHF model), the SFT model and its from-scratch control on the same
items (greedy ``cot`` of the SFT and RLHF models on ``--rl-limit`` items, a superset of
them: RL's few points need more items than the strategies' gaps), closed book against
retrieval on every held-out ``facts`` item (seen and unseen kingdoms), mode collapse across
base/SFT/RLHF, and the reward of the SFT and RLHF policies on the same held-out prompts
(:mod:`training.rl_reward`). It then writes ``RUN/REPORT.md``: the claims of "State of GPT"
as a table, each with its goal and this model's own figure, and the figures behind them. A
claim that one strategy beats another is *shown* only when the paired 95% interval of the
difference excludes 0. Every step is an evaluation run (:func:`evals.run.run_eval`) with
``resume``, so an interrupted demo continues where it stopped and a finished one is rebuilt
in seconds; the claims are judged by :func:`evals.report.demo_claims`. The wall time of
each step's first pass is kept in ``RUN/eval/demo_timing.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assist.cli._flags import add_flags, from_args, int_at_least, opt

__all__ = ["DemoConfig", "add_parser", "run"]


@dataclass
class DemoConfig:
    run: Path = opt(Path("runs/tiny"), "a run folder from `assist train`")
    limit: int = opt(300, "held-out arith items per claim", type=int_at_least(1))
    # RL moves greedy accuracy by a few points, which 300 items cannot tell from 0 (a +4
    # point change has a paired interval of about +-6 there); the SFT -> RLHF claim reads
    # greedy `cot` of both models on more of the test split (1000 items: all of tiny's).
    rl_limit: int = opt(1000, "held-out arith items for the SFT -> RLHF claim (never fewer than --limit)",
                        type=int_at_least(1))
    reward_prompts: int = opt(384, "held-out prompts (x 4 samples) on which the reward of the SFT "
                                   "and RLHF policies is compared", type=int_at_least(1))
    facts_limit: int | None = opt(None, "held-out facts items (default: all of them, seen and "
                                        "unseen)")
    concurrency: int = opt(16, "runs in flight")


def _eval(**fields: Any) -> None:
    """One evaluation run, resumable, through the harness's Python API; too many errored
    runs stop the demo with ``assist eval run``'s status 3."""
    from rich.console import Console

    from assist.cli.eval import ERRORS_EXIT
    from evals.report import rich_table
    from evals.run import EvalConfig, run_eval

    # sc@16 and bon@16 draw the same seeded samples of an item: computed once (the tokens and
    # the time still count for each strategy)
    cfg = EvalConfig(resume=True, reuse_calls=True, **fields)
    outcome = run_eval(cfg)
    Console(width=max(160, Console().width)).print(rich_table(outcome.summary))
    errors = outcome.errors
    if errors.errored_runs and errors.rate > cfg.max_error_rate:
        print(f"assist demo: {errors.errored_runs} of {errors.runs} runs in {outcome.out} "
              f"errored (first: {errors.examples[0]}); run the demo again to retry them",
              file=sys.stderr)
        raise SystemExit(ERRORS_EXIT)


def _timed(timing: dict[str, float], name: str, work: Callable[[], None]) -> None:
    """Run one step; its wall time is recorded the first time (a resumed pass keeps it)."""
    t0 = time.perf_counter()
    work()
    timing.setdefault(name, round(time.perf_counter() - t0, 2))


def run(cfg: DemoConfig) -> int:
    from rich.console import Console

    from assist.cli._demo_report import write_report
    from evals.diversity import DiversityConfig, measure_checkpoints
    from evals.report import DEMO_ARITH, DEMO_FACTS
    from training.rl_reward import measure_run

    console = Console()
    run_dir = cfg.run
    model = run_dir / "rlhf"
    if not (model / "config.json").is_file() or not (run_dir / "metrics.json").is_file():
        print(f"assist demo: no trained run in {run_dir} (run `assist train --preset tiny --out {run_dir}`)",
              file=sys.stderr)
        return 2
    ev = run_dir / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    timing_path = ev / "demo_timing.json"
    saved = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    timing: dict[str, float] = dict(saved.get("steps", {}))
    common: dict[str, Any] = {"concurrency": cfg.concurrency}
    arith = {"limit": cfg.limit, **common}
    arith_rl = {**arith, "limit": max(cfg.limit, cfg.rl_limit)}
    facts = {"limit": cfg.facts_limit, **common}

    steps: list[tuple[str, str, Callable[[], None]]] = [
        ("arith", f"strategies on arith ({DEMO_ARITH})",
         lambda: _eval(task="arith", strategies=DEMO_ARITH, model=str(model),
                       out=str(ev / "arith"), **arith)),
        ("arith-rlhf", "the RLHF model, greedy cot on the SFT -> RLHF claim's items",
         lambda: _eval(task="arith", strategies="cot", model=str(model),
                       out=str(ev / "arith-rlhf"), **arith_rl)),
        ("arith-sft", "the SFT model, greedy cot (RLHF's baseline)",
         lambda: _eval(task="arith", strategies="cot", model=str(run_dir / "sft"),
                       out=str(ev / "arith-sft"), **arith_rl)),
        ("arith-scratch", "SFT from a random init, greedy cot (pretraining's control)",
         lambda: _eval(task="arith", strategies="cot", model=str(run_dir / "sft-scratch"),
                       out=str(ev / "arith-scratch"), **arith)),
        ("facts", "closed book vs retrieval on facts, seen and unseen kingdoms",
         lambda: _eval(task="facts", strategies=DEMO_FACTS, model=str(model),
                       out=str(ev / "facts"), **facts)),
    ]
    t_all = time.perf_counter()
    n = len(steps) + 1
    for i, (name, title, work) in enumerate(steps, 1):
        console.rule(f"[bold]{i}/{n} {title}")
        if name == "arith-scratch" and not (run_dir / "sft-scratch" / "config.json").is_file():
            console.print("[yellow]no sft-scratch stage in this run: the pretraining claim is skipped")
            continue
        _timed(timing, name, work)
    console.rule(f"[bold]{n}/{n} mode collapse: base, sft, rlhf")
    div_done = (ev / "diversity" / "diversity.json").is_file()
    _timed(timing, "diversity", lambda: None if div_done else measure_checkpoints(
        [run_dir / s for s in ("base", "sft", "rlhf")], DiversityConfig(), ev / "diversity"))
    if (run_dir / "sft" / "config.json").is_file():
        console.rule("[bold]and: did RL raise the reward? SFT and RLHF on the same held-out prompts")
        reward_path = ev / "rl_reward.json"
        done = reward_path.is_file() and \
            json.loads(reward_path.read_text()).get("prompts_asked") == cfg.reward_prompts
        _timed(timing, "rl-reward", lambda: None if done else measure_run(
            run_dir, reward_path, prompts=cfg.reward_prompts))
    doc = {"steps": timing, "first_pass_wall_s": saved.get("first_pass_wall_s", round(sum(timing.values()), 2)),
           "last_pass_wall_s": round(time.perf_counter() - t_all, 2)}
    timing_path.write_text(json.dumps(doc, indent=2) + "\n")
    path, table = write_report(run_dir, cfg.limit, cfg.rl_limit)
    console.print(table)
    console.print(f"[bold green]wrote {path}[/bold green]")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="evaluate a trained run and write RUN/REPORT.md (the main job's second half)")
    add_flags(p, DemoConfig)
    p.set_defaults(func=lambda a: run(from_args(DemoConfig, a)))
    return p
