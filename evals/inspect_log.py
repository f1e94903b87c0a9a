"""An eval run as inspect-ai eval logs, so ``inspect view --log-dir DIR`` opens it.

``assist eval run --out DIR`` calls :func:`write_inspect_logs` after ``results.json``: one
``.eval`` file per strategy, built with inspect-ai's own log types and written by its own
:func:`inspect_ai.log.write_eval_log`. The mapping:

- a strategy is a task run: ``eval.task`` is the task (``arith``), ``eval.solver`` and the
  plan's one step are the strategy spec (``sc@8``), the file is
  ``<created>_<task>-<strategy>_<id>.eval``;
- the K runs of an item (``--samples``) are its epochs (``epoch`` j+1 is run j, seed
  ``--seed`` + j);
- the task's scorer is the sample's score ``match``: ``C`` or ``I`` (an errored run is
  ``I``, as in ``results.json``), the extracted answer in ``answer``; reduced per item with
  ``mean`` and summarized as ``accuracy`` — the same number as ``results.json``'s;
- the strategy's trace (votes, critiques, tool calls, passages), the seed, the number of
  model calls, the finish reason and any error go into the sample's ``metadata``;
- tokens go into ``model_usage`` (per sample and in the log's ``stats``).

inspect-ai is an optional dependency (the ``dev`` extra): without it no log is written and
:func:`write_inspect_logs` says so by returning ``None``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["SCORER", "available", "log_name", "write_inspect_logs"]

SCORER = "match"  # the score's name in every sample and in the results
_STOP = {"stop": "stop", "length": "max_tokens", "tool_calls": "tool_calls",
         "content_filter": "content_filter"}


def available() -> bool:
    """Whether inspect-ai is installed (it comes with the ``dev`` extra)."""
    return importlib.util.find_spec("inspect_ai") is not None


def _clean(text: str) -> str:
    """A file-name component as inspect cleans one, and nothing a shell or URL minds."""
    return re.sub(r"[^A-Za-z0-9.@=,-]+", "-", text.replace("_", "-")).strip("-") or "x"


def log_name(created: str, task: str, strategy: str, run_id: str) -> str:
    """``<created>_<task>-<strategy>_<id>.eval``: inspect's ``{created}_{task}_{id}`` names."""
    stamp = created.replace(":", "-").replace("+", "-")
    return f"{stamp}_{_clean(task)}-{_clean(strategy)}_{run_id}.eval"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _iso(when: datetime | str) -> str:
    if isinstance(when, str):
        return when
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


def _sample(record: Mapping[str, Any], j: int, run: Mapping[str, Any], model: str) -> Any:
    from inspect_ai.log import EvalSample
    from inspect_ai.model import (
        ChatMessageAssistant,
        ChatMessageUser,
        ModelOutput,
        ModelUsage,
    )
    from inspect_ai.scorer import Score

    error = run.get("error")
    correct = bool(run.get("correct")) and error is None
    text = str(run.get("text") or "")
    question = str(record.get("question") or "")
    stop = _STOP.get(str(run.get("finish_reason")), "unknown")
    prompt, completion = int(run.get("prompt_tokens") or 0), int(run.get("completion_tokens") or 0)
    usage = ModelUsage(input_tokens=prompt, output_tokens=completion,
                       total_tokens=prompt + completion)
    metadata = {"trace": _jsonable(run.get("trace") or []), "seed": run.get("seed"),
                "calls": run.get("calls"), "finish_reason": run.get("finish_reason"),
                "latency_s": run.get("latency_s"), "error": error}
    if "retry" in run:
        metadata["retry"] = run["retry"]
    explanation = f"errored: {error}" if error is not None else None
    return EvalSample(
        id=str(record["item"]), epoch=j + 1, input=question,
        target=str(record.get("reference") if record.get("reference") is not None else ""),
        messages=[ChatMessageUser(content=question),
                  ChatMessageAssistant(content=text, model=model, source="generate")],
        output=ModelOutput.from_content(model, text, stop_reason=stop),  # type: ignore[arg-type]
        scores={SCORER: Score(value="C" if correct else "I", answer=run.get("answer"),
                              explanation=explanation)},
        metadata=metadata, model_usage={model: usage},
        total_time=run.get("latency_s"), working_time=run.get("latency_s"),
        uuid=uuid.uuid4().hex)


def _log(task: str, strategy: str, records: Sequence[Mapping[str, Any]],
         stats: Mapping[str, Any], *, run_id: str, model: str, created: str, completed: str,
         epochs: int, dataset: Mapping[str, Any], packages: Mapping[str, str],
         commit: str, metadata: Mapping[str, Any]) -> Any:
    from inspect_ai.log import (
        EvalConfig,
        EvalDataset,
        EvalLog,
        EvalMetric,
        EvalPlan,
        EvalPlanStep,
        EvalResults,
        EvalRevision,
        EvalSampleReductions,
        EvalSampleScore,
        EvalScore,
        EvalSpec,
        EvalStats,
    )
    from inspect_ai.model import ModelUsage

    samples = [_sample(rec, j, run, model) for rec in records
               for j, run in enumerate(rec.get("runs") or [])]
    total = ModelUsage()
    for s in samples:
        total = total + s.model_usage[model]
    reduced = []
    for rec in records:
        runs = rec.get("runs") or []
        value = (sum(bool(r.get("correct")) and r.get("error") is None for r in runs) / len(runs)
                 if runs else 0.0)
        reduced.append(EvalSampleScore(value=value, sample_id=str(rec["item"])))
    lo, hi = stats["ci95"]
    score = EvalScore(
        name=SCORER, scorer=SCORER, reducer="mean", scored_samples=len(records),
        unscored_samples=0,
        metrics={"accuracy": EvalMetric(name="accuracy", value=stats["accuracy"]),
                 "ci95_lo": EvalMetric(name="ci95_lo", value=lo),
                 "ci95_hi": EvalMetric(name="ci95_hi", value=hi)})
    revision = (EvalRevision(type="git", origin=str(metadata.get("origin") or ""), commit=commit,
                             dirty=commit.endswith("-dirty"))
                if commit and commit != "unknown" else None)
    spec = EvalSpec(
        eval_id=uuid.uuid4().hex, run_id=run_id, created=created, task=task,
        task_id=f"{_clean(task)}-{_clean(strategy)}", task_display_name=f"{task} · {strategy}",
        task_args={"strategy": strategy}, solver=strategy, solver_args={},
        dataset=EvalDataset(name=task, location=str(dataset.get("location") or "") or None,
                            samples=len(records), sample_ids=[str(r["item"]) for r in records]),
        model=model, config=EvalConfig(epochs=epochs, epochs_reducer=["mean"]),
        revision=revision, packages=dict(packages),
        metadata={"strategy": strategy, "dataset_hash": dataset.get("hash"), **metadata},
    )
    log = EvalLog(
        status="success", eval=spec,
        plan=EvalPlan(steps=[EvalPlanStep(solver=strategy, params={})]),
        results=EvalResults(total_samples=len(samples), completed_samples=len(samples),
                            scores=[score]),
        stats=EvalStats(started_at=created, completed_at=completed, model_usage={model: total}),
        samples=samples,
    )
    # set after construction: EvalLog's validator copies ``reductions`` into ``results``
    # only when given plain dicts
    log.reductions = [EvalSampleReductions(scorer=SCORER, reducer="mean", samples=reduced)]
    return log


def write_inspect_logs(
    out: Path, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], *,
    model: str, started: datetime | str, completed: datetime | str, epochs: int,
    dataset: Mapping[str, Any] | None = None, packages: Mapping[str, str] | None = None,
    commit: str = "unknown", metadata: Mapping[str, Any] | None = None,
) -> list[Path] | None:
    """Write one inspect eval log per (task, strategy) of ``records`` into ``out``; their
    paths, or None when inspect-ai is not installed.

    ``summary`` is :func:`evals.report.summarize`'s (the accuracy and its interval come from
    it, so the log and ``results.json`` agree); ``model`` is the model's name as inspect
    shows it; ``epochs`` is K. Logs this function wrote earlier for the same strategies
    (a run resumed in ``out``) are replaced.
    """
    if not available():
        return None
    from inspect_ai.log import write_eval_log

    created, completed_at = _iso(started), _iso(completed)
    run_id = uuid.uuid4().hex[:22]
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for rec in records:
        grouped.setdefault((str(rec["task"]), str(rec["strategy"])), []).append(rec)
    paths = []
    for (task, strategy), recs in grouped.items():
        pattern = f"*_{_clean(task)}-{_clean(strategy)}_*.eval"
        for old in out.glob(pattern):  # the same run, written before a resume
            old.unlink()
        log = _log(task, strategy, recs, summary[task][strategy], run_id=run_id, model=model,
                   created=created, completed=completed_at, epochs=epochs,
                   dataset=dataset or {}, packages=packages or {}, commit=commit,
                   metadata=metadata or {})
        path = out / log_name(created, task, strategy, run_id)
        write_eval_log(log, str(path), format="eval")
        paths.append(path)
    return paths
