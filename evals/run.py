"""One evaluation run from its typed config: the Python API under ``assist eval run``.

:func:`run_eval` does everything ``assist eval run`` does except print and choose an exit
status: checks the config, builds the task and strategies, locks ``cfg.out``, checks a
resumed run's identity, loads the model (or connects to the server), evaluates, and writes
``samples.jsonl``, ``results.json``, ``report.md`` and, when inspect-ai is installed, one
inspect eval log per strategy (``*.eval``, see :mod:`evals.inspect_log`). Every user mistake is an
:class:`EvalError` raised before any model loads; Ctrl-C keeps the finished items. The demo
(``assist demo``) calls it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from evals._config import EvalConfig, EvalError, default_out, generated_task, run_settings

__all__ = ["EvalConfig", "EvalError", "EvalOutcome", "default_out", "generated_task", "run_eval",
           "run_settings", "server_model"]


class EvalOutcome(NamedTuple):
    out: Path
    records: list[dict[str, Any]]
    errors: Any  # evals.harness.error_stats(records)
    summary: dict[str, Any]


def server_model(cfg: EvalConfig) -> str:
    """The model name to ask the server for, after checking it answers GET /v1/models."""
    from assist import list_models
    from assist.errors import AssistError

    try:
        ids = [str(m["id"]) for m in list_models(cfg.base_url or "", cfg.api_key)]
    except AssistError as exc:
        raise EvalError(f"--base-url {cfg.base_url}: cannot list the server's models "
                        f"({exc.message})") from exc
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
        options = {"compile": True} if cfg.compile else {}  # check() allowed it for torch only
        model = assist.load(cfg.model or "", engine=cfg.engine, **options)
    try:
        return await evaluate(model, task, strategies, items, samples=cfg.samples,
                              concurrency=cfg.concurrency, seed=cfg.seed, out=out,
                              resume=cfg.resume, identity=identity, reuse_calls=cfg.reuse_calls)
    finally:
        if hasattr(model, "aclose"):
            await model.aclose()
        else:
            model.close()


def run_eval(cfg: EvalConfig, *, out: Path | None = None, console: Any = None) -> EvalOutcome:
    """Evaluate ``cfg.strategies`` on ``cfg.task`` and write the run's files to ``out`` (by
    default ``cfg.out``, else ``runs/eval/<task>-<time>``). ``console`` (rich, stderr) gets
    the progress."""
    from rich.console import Console

    from evals._config import build_task, check
    from evals.harness import claim, error_stats, locked, parse_strategies, prepare_strategies

    console = console or Console(stderr=True)
    out = out or (Path(cfg.out) if cfg.out else default_out(Path(cfg.task).stem))
    specs = check(cfg)
    if not 0 <= cfg.max_error_rate <= 1:
        raise EvalError(f"--max-error-rate must be between 0 and 1, not {cfg.max_error_rate}")
    strategies = parse_strategies(specs)
    task = build_task(cfg)
    for problem in getattr(task, "problems", [])[:3]:
        console.print(f"[yellow]skipped {problem}[/yellow]")
    items = task.split("test", cfg.limit)
    model_name = server_model(cfg) if cfg.base_url else None
    identity = _identity(cfg, task, specs, items, model_name)
    with contextlib.ExitStack() as stack:
        # The lock before anything touches --out (the rag store, samples, results), held
        # until the report is written; then the identity check, before any model loads.
        stack.enter_context(locked(out))
        claim(out, identity, resume=cfg.resume, console=console)
        ready = prepare_strategies(strategies, task, out=out, stack=stack, console=console,
                                   model_path=Path(cfg.model) if cfg.model else None,
                                   max_tokens=cfg.max_tokens, embedder=cfg.embedder)
        started = datetime.now(UTC)
        records = asyncio.run(_evaluate(cfg, model_name, task, ready, items, out, identity))
        ended = datetime.now(UTC)
        errors = error_stats(records)
        summary = _write(cfg, specs, task, len(items), model_name, out, records, errors,
                         identity=identity, times=(started, ended), console=console)
    return EvalOutcome(out, records, errors, summary)


def _inspect_model(cfg: EvalConfig, model_name: str | None) -> str:
    """The model as inspect names one, ``provider/name``: ``assist/<checkpoint folder>``, or
    ``openai-api/assist/<served name>`` as ``docs/peers.md`` calls a server from inspect."""
    if cfg.model:
        return f"assist/{Path(cfg.model).resolve().name}"
    return f"openai-api/assist/{model_name}"


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
           out: Path, records: list[dict[str, Any]], errors: Any, *,
           identity: dict[str, Any], times: tuple[datetime, datetime],
           console: Any) -> dict[str, Any]:
    from evals import inspect_log
    from evals.report import _commit, packages, summarize, write_report, write_results

    summary = summarize(records, baseline=cfg.baseline)
    config = dataclasses.asdict(cfg)
    if config["api_key"]:
        config["api_key"] = "***"  # results.json gets shared; the key must not travel with it
    model = cfg.model or f"{model_name} @ {cfg.base_url}"
    config.update(strategy_specs=specs, task_name=task.name, items=n_items, served_model=model,
                  task_settings=dataclasses.asdict(task.config) if hasattr(task, "config") else None)
    commit, versions = _commit(), packages()
    started, ended = (t.isoformat(timespec="seconds") for t in times)
    dataset = {"name": task.name, "hash": identity["dataset"], "items": n_items,
               "location": cfg.task if cfg.task.endswith(".jsonl") else
               (cfg.data_dir or None) if cfg.task == "gsm8k" else None}
    write_results(out, summary, config, commit=commit, extra={
        "started": started, "ended": ended, "dataset": dataset,
        "errors": {**errors._asdict(), "rate": errors.rate, "max_error_rate": cfg.max_error_rate}})
    logs = inspect_log.write_inspect_logs(
        out, records, summary, model=_inspect_model(cfg, model_name), started=times[0],
        completed=times[1], epochs=cfg.samples, dataset=dataset, packages=versions,
        commit=commit, metadata={"seed": cfg.seed, "identity": identity})
    if logs is None:
        console.print("[yellow]inspect-ai is not installed: no eval log for `inspect view` "
                      "(pip install 'assist\\[dev]')[/yellow]")  # \\[: a literal bracket, not markup
    setup = (f"## Setup\n\n- model: `{model}`\n- task: `{task.name}`, {n_items} test items, "
             f"K={cfg.samples} run(s) each, seed {cfg.seed}\n- strategies: "
             + ", ".join(f"`{s}`" for s in specs)
             + f"\n- errored: {errors.errored_items} of {errors.items} items "
               f"({errors.errored_runs} of {errors.runs} runs; `--resume` runs them again)")
    sections = [setup] + ([_errors_section(errors, cfg.max_error_rate)]
                          if errors.errored_runs else [])
    write_report(out, summary, title=f"{task.name}: {', '.join(specs)}", extra_sections=sections)
    return summary
