"""The task world: generated ``arith`` and ``facts``, file-based ``gsm8k`` and JSONL tasks."""

from __future__ import annotations

from pathlib import Path

from evals.tasks._base import SPLITS, Sample, Score, Split, Task
from evals.tasks.arith import ArithConfig, ArithTask
from evals.tasks.facts import FactsConfig, FactsTask
from evals.tasks.gsm8k import JsonlError, JsonlTask, gsm8k_task, read_jsonl
from strategies.extract import EXTRACTORS, final_line, gsm8k_flexible, gsm8k_strict, normalize

__all__ = [
    "EXTRACTORS",
    "SPLITS",
    "ArithConfig",
    "ArithTask",
    "FactsConfig",
    "FactsTask",
    "JsonlError",
    "JsonlTask",
    "Sample",
    "Score",
    "Split",
    "Task",
    "final_line",
    "get_task",
    "gsm8k_flexible",
    "gsm8k_strict",
    "gsm8k_task",
    "normalize",
    "read_jsonl",
]


def get_task(name: str, *, data_dir: Path | None = None) -> Task:
    """A task by name (``arith``, ``facts``, ``gsm8k``) or by a path to a ``.jsonl`` file."""
    if name == "arith":
        return ArithTask()
    if name == "facts":
        return FactsTask()
    if name == "gsm8k":
        if data_dir is None:
            raise JsonlError("the gsm8k task needs a data folder with test.jsonl (--data-dir)")
        return gsm8k_task(data_dir)
    path = Path(name)
    if path.suffix == ".jsonl":
        return JsonlTask(path.stem, {"test": path})
    raise ValueError(f"unknown task {name!r}; expected arith, facts, gsm8k or a .jsonl file")
