"""``assist eval``: score strategies on tasks, compare runs, list what exists, measure diversity.

::

    assist eval run --task arith --strategies direct,cot,sc@8 --model runs/tiny/rlhf
                    [--limit N] [--samples K] [--out DIR] [--resume] ...
    assist eval run --task facts --strategies direct,rag --base-url http://h:8000/v1
    assist eval --task arith ...          # the same: `run` is the default subcommand
    assist eval compare DIR1 DIR2 ...
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
run exit 3 once its results are written. ``assist.cli`` mounts this with
:func:`add_eval_parser`; ``python -m assist._eval_cli eval ...`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assist._argtypes import standalone

if TYPE_CHECKING:  # evals builds on assist: the CLI imports it only when a command runs
    from evals._config import DiversityConfig, EvalConfig

__all__ = ["add_eval_parser", "main", "measure_diversity"]

ERRORS_EXIT = 3  # the run finished and wrote its results, but too many of its runs errored

TASKS = {
    "arith": "generated multi-step word problems (GSM8K format, `#### N`)",
    "facts": "questions about a fictional world; half of it is only in the rag store",
    "gsm8k": "grade-school math from --data-dir/test.jsonl",
    "PATH.jsonl": "your own: question/answer per line (--extractor, --on-bad-line)",
}


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` and its subcommands on ``assist``'s subparsers; each leaf sets
    ``func`` to a handler that takes the parsed args and returns an exit code."""
    from evals._config import DiversityConfig, EvalConfig, add_flags

    ev = subparsers.add_parser("eval", help="score strategies on tasks, compare runs, diversity",
                               description="Score strategies on a task. `assist eval --task ...` "
                                           "is short for `assist eval run --task ...`.")
    add_flags(ev, EvalConfig, suppress=True)  # the shorthand; unset flags keep the defaults
    ev.set_defaults(func=_run)
    sub = ev.add_subparsers(dest="eval_command", metavar="{run,compare,ls,diversity}")
    r = sub.add_parser("run", help="evaluate strategies on a task (writes samples, results, report)")
    add_flags(r, EvalConfig)
    r.set_defaults(func=_run)
    c = sub.add_parser("compare", help="side-by-side accuracy of several eval folders")
    c.add_argument("dirs", nargs="+", metavar="DIR")
    c.set_defaults(func=_compare)
    ls = sub.add_parser("ls", help="list the tasks and strategies")
    ls.set_defaults(func=_ls)
    d = sub.add_parser("diversity", help="entropy and distinct-n of checkpoints' samples")
    add_flags(d, DiversityConfig)
    d.set_defaults(func=_diversity)
    return ev


def _fail(what: str, message: str) -> int:
    print(f"assist eval {what}: {message}", file=sys.stderr)
    return 2


# -- run -----------------------------------------------------------------------------------
def _server_model(cfg: EvalConfig) -> str:
    """The model name to ask the server for, after checking it answers GET /v1/models."""
    import httpx

    from evals._config import EvalError

    root = cfg.base_url.rstrip("/") if cfg.base_url else ""
    root = root.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        response = httpx.get(root + "/v1/models", headers=headers, timeout=10)
        response.raise_for_status()
        ids = [str(m["id"]) for m in response.json()["data"]]
    except httpx.HTTPError as exc:
        raise EvalError(f"--base-url {cfg.base_url}: cannot list the server's models "
                        f"({type(exc).__name__}: {exc})") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"--base-url {cfg.base_url}: /v1/models is not an OpenAI model list") from exc
    if cfg.model_name:
        return cfg.model_name
    if not ids:
        raise EvalError(f"--base-url {cfg.base_url} serves no models; pass --model-name")
    return ids[0]


class _NoModel:
    """Stands in for the model when every record is already in samples.jsonl."""

    name = "none"
    supports_n = True

    async def chat(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no model was loaded: the resumed run had nothing left to do")

    def close(self) -> None:
        pass


def _identity(cfg: EvalConfig, task: Any, specs: list[str], items: list,
              model_name: str | None) -> dict[str, Any]:
    """What ``--resume`` must find unchanged in ``--out`` (see ``evals.harness.claim``)."""
    from evals.harness import run_identity

    if cfg.model:
        model, extra = str(Path(cfg.model).resolve()), {"engine": cfg.engine}
    else:
        model, extra = f"{model_name} @ {(cfg.base_url or '').rstrip('/')}", {}
    return run_identity(task, specs, model=model, seed=cfg.seed, samples=cfg.samples,
                        items=items, max_tokens=cfg.max_tokens, **extra)


async def _evaluate(cfg: EvalConfig, model_name: str | None, task: Any, strategies: dict,
                    items: list, out: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Open the model inside the loop (the remote client's pool belongs to it), run, close."""
    import assist
    from evals.harness import evaluate, pending

    if not pending(out, task, list(strategies), items, resume=cfg.resume):
        model: Any = _NoModel()  # a finished run resumed: nothing to load
    elif cfg.base_url:
        model = assist.connect(cfg.base_url, model_name or "", cfg.api_key)
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its weight-loading bar is noise beside ours
        model = assist.load(cfg.model or "", engine=cfg.engine)
    try:
        return await evaluate(model, task, strategies, items, samples=cfg.samples,
                              concurrency=cfg.concurrency, seed=cfg.seed, out=out,
                              resume=cfg.resume, identity=identity)
    finally:
        if hasattr(model, "aclose"):
            await model.aclose()
        else:
            model.close()


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from evals._config import (
        EvalConfig,
        EvalError,
        build_task,
        check,
        config_from_args,
        default_out,
    )
    from evals.harness import claim, error_stats, locked, parse_strategies, prepare_strategies
    from strategies import SpecError

    cfg = config_from_args(EvalConfig, args)
    console = Console(stderr=True)
    out = Path(cfg.out) if cfg.out else default_out(Path(cfg.task).stem)
    try:
        specs = check(cfg)
        if not 0 <= cfg.max_error_rate <= 1:
            raise EvalError(f"--max-error-rate must be between 0 and 1, not {cfg.max_error_rate}")
        strategies = parse_strategies(specs)
        task = build_task(cfg)
        for problem in getattr(task, "problems", [])[:3]:
            console.print(f"[yellow]skipped {problem}[/yellow]")
        items = task.split("test", cfg.limit)
        model_name = _server_model(cfg) if cfg.base_url else None
        identity = _identity(cfg, task, specs, items, model_name)
        with contextlib.ExitStack() as stack:
            # The lock before anything touches --out (the rag store, samples, results), held
            # until the report is written; then the identity check, before any model loads.
            stack.enter_context(locked(out))
            claim(out, identity, resume=cfg.resume, console=console)
            ready = prepare_strategies(strategies, task, out=out, stack=stack, console=console,
                                       model_path=Path(cfg.model) if cfg.model else None,
                                       max_tokens=cfg.max_tokens, embedder=cfg.embedder)
            records = asyncio.run(_evaluate(cfg, model_name, task, ready, items, out, identity))
            errors = error_stats(records)
            _write(cfg, specs, task, len(items), model_name, out, records, errors)
    except (EvalError, SpecError) as exc:
        return _fail("run", str(exc))
    except KeyboardInterrupt:
        print(f"assist eval run: interrupted; finished items are kept in {out}/samples.jsonl, "
              f"continue with --resume --out {out}", file=sys.stderr)
        return 130
    if not errors.errored_runs:
        return 0
    over = errors.rate > cfg.max_error_rate
    print(f"assist eval run: {errors.errored_runs} of {errors.runs} runs "
          f"({100 * errors.rate:.1f}%) errored, on {errors.errored_items} of {errors.items} "
          f"items, and count as wrong ({'above' if over else 'within'} --max-error-rate "
          f"{cfg.max_error_rate:g}); first error: {errors.examples[0]}; run them again with "
          f"--resume --out {out}", file=sys.stderr)
    return ERRORS_EXIT if over else 0


def _errors_section(errors: Any, max_error_rate: float) -> str:
    lines = [f"## Errors\n\n**{errors.errored_items} of {errors.items} items errored** "
             f"({errors.errored_records} of {errors.records} item-strategy records, "
             f"{errors.errored_runs} of {errors.runs} runs, {100 * errors.rate:.1f}%; the "
             f"threshold --max-error-rate is {100 * max_error_rate:g}%). An errored run is a "
             "model or transport failure, not an answer: it counts as wrong above, and "
             "`assist eval run --resume` runs it again.", ""]
    lines += [f"- `{message[:300]}`" for message in errors.examples]
    return "\n".join(lines)


def _write(cfg: EvalConfig, specs: list[str], task: Any, n_items: int, model_name: str | None,
           out: Path, records: list[dict[str, Any]], errors: Any) -> None:
    from rich.console import Console

    from evals.report import rich_table, summarize, write_report, write_results

    summary = summarize(records, baseline=cfg.baseline)
    config = dataclasses.asdict(cfg)
    if config["api_key"]:
        config["api_key"] = "***"  # results.json gets shared; the key must not travel with it
    model = cfg.model or f"{model_name} @ {cfg.base_url}"
    config.update(strategy_specs=specs, task_name=task.name, items=n_items, served_model=model,
                  task_settings=dataclasses.asdict(task.config) if hasattr(task, "config") else None)
    write_results(out, summary, config, extra={"errors": {
        **errors._asdict(), "rate": errors.rate, "max_error_rate": cfg.max_error_rate}})
    setup = (f"## Setup\n\n- model: `{model}`\n- task: `{task.name}`, {n_items} test items, "
             f"K={cfg.samples} run(s) each, seed {cfg.seed}\n- strategies: "
             + ", ".join(f"`{s}`" for s in specs)
             + f"\n- errored: {errors.errored_items} of {errors.items} items "
               f"({errors.errored_runs} of {errors.runs} runs; `--resume` runs them again)")
    sections = [setup] + ([_errors_section(errors, cfg.max_error_rate)]
                          if errors.errored_runs else [])
    write_report(out, summary, title=f"{task.name}: {', '.join(specs)}", extra_sections=sections)
    Console(width=max(160, Console().width)).print(rich_table(summary))  # 9 columns
    print(f"wrote {out}/samples.jsonl, results.json and report.md")


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
def measure_diversity(path: Path, questions: Sequence[str], cfg: DiversityConfig) -> dict[str, Any]:
    """Mode-collapse figures of one checkpoint: ``cfg.k`` samples per question at
    ``cfg.temperature``; mean per-token entropy of the model's next-token distribution
    along its own samples and EAD distinct-1/2/3 per prompt (averaged), exactly as the
    training pipeline's ``metrics.json`` computes them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from assist import render
    from assist._sampling import sample
    from evals import diversity

    hf_logging.disable_progress_bar()  # its weight-loading bar is noise in a CLI
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(path)
    model = model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    eos = model.generation_config.eos_token_id
    stops = [eos] if isinstance(eos, int) else list(eos or [tok.eos_token_id])
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    prompts = [tok.encode(render([{"role": "user", "content": q}], add_generation_prompt=True),
                          add_special_tokens=False) for q in questions]
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(cfg.k)]
    per_prompt: list[list[list[int]]] = [[] for _ in prompts]
    entropies: list[list[float]] = []
    for start in range(0, len(flat), 64):
        chunk = flat[start: start + 64]
        done = sample(model, [p for _, p in chunk], max_new_tokens=cfg.max_new_tokens,
                      stop_ids=stops, pad_id=pad, temperature=cfg.temperature,
                      seed=cfg.seed + start)
        for (i, _), completion in zip(chunk, done, strict=True):
            per_prompt[i].append(completion.tokens)
            entropies.append(completion.entropies)
    row: dict[str, Any] = {"model": path.name, "path": str(path),
                           "entropy": round(diversity.mean_entropy(entropies), 4)}
    for n in (1, 2, 3):
        values = [diversity.ead_distinct_n(seqs, n, len(tok)) for seqs in per_prompt]
        row[f"distinct_{n}"] = round(sum(values) / len(values), 4)
    row["samples"] = len(flat)
    row["mean_length"] = round(sum(len(s) for g in per_prompt for s in g) / len(flat), 2)
    return row


def _diversity(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from evals._config import (
        DiversityConfig,
        EvalError,
        config_from_args,
        default_out,
        generated_task,
        run_settings,
    )
    from evals.report import plot_diversity

    cfg = config_from_args(DiversityConfig, args)
    paths = [Path(p.strip()) for p in cfg.models.split(",") if p.strip()]
    if not paths:
        return _fail("diversity", "--models is required (comma-separated checkpoint folders)")
    for path in paths:
        if not (path / "config.json").is_file():
            return _fail("diversity", f"--models {path}: no Hugging Face checkpoint there")
    if cfg.prompts < 1 or cfg.k < 1 or cfg.max_new_tokens < 1:
        return _fail("diversity", "--prompts, --k and --max-new-tokens must be at least 1")
    try:  # the prompts the first model's run measured itself on, the same for every model
        arith = generated_task("arith", run_settings(paths[0].parent / "metrics.json"))
    except EvalError as exc:
        return _fail("diversity", str(exc))
    questions = [s.question for s in arith.split("test")[-cfg.prompts:]]
    out = Path(cfg.out) if cfg.out else default_out("diversity")
    try:
        rows = [measure_diversity(path, questions, cfg) for path in paths]
    except KeyboardInterrupt:
        return 130
    if len({r["model"] for r in rows}) < len(rows):  # same stage names: label by full path
        for r in rows:
            r["model"] = r["path"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "diversity.json").write_text(json.dumps(
        {"config": dataclasses.asdict(cfg), "rows": rows}, indent=2) + "\n")
    plot_diversity(rows, out / "diversity.png")
    table = Table(title=f"diversity: {cfg.k} samples x {len(questions)} arith prompts, "
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
    return standalone(add_eval_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
