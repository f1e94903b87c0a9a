"""A run's ledger, ``RUN/metrics.json``: which stages are finished, with their figures.

A stage listed there, with its folder on disk, is finished. Two processes may finish
stages of one run at once (``scratch`` beside ``rm`` and ``rl``: training/pipeline.py), so
every read-modify-write holds the run's lock, and the file is replaced atomically.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training.config import STAGES

__all__ = ["FOLDER", "done", "editing", "first_difference", "read", "record_wall"]

FOLDER = {"tokenizer": "tokenizer", "pretrain": "base", "sft": "sft", "scratch": "sft-scratch",
          "rm": "rm", "rl": "rlhf"}


def read(out: Path) -> dict[str, Any]:
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _write(out: Path, ledger: dict[str, Any]) -> None:
    # Stages in pipeline order, whichever finished first (scratch may end after rm).
    ledger["stages"] = {s: ledger["stages"][s] for s in STAGES if s in ledger["stages"]}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(ledger, indent=2))
    tmp.replace(out / "metrics.json")


def done(out: Path, stage: str) -> bool:
    return stage in read(out)["stages"] and (out / FOLDER[stage]).exists()


@contextmanager
def editing(out: Path) -> Iterator[dict[str, Any]]:
    """The ledger to change in place, under ``out``'s lock: read on entry, written back on a
    clean exit (an exception leaves the file as it was). Two processes may finish stages of
    one run at once; the lock keeps one's write from dropping the other's."""
    with open(out / "metrics.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            ledger = read(out)
            yield ledger
            _write(out, ledger)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_wall(out: Path, wall_s: float) -> dict[str, Any]:
    """The run's wall time so far (every invocation's, up to its last finished stage)."""
    with editing(out) as ledger:
        ledger["wall_s"] = round(wall_s, 2)
    return ledger


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """The dotted name of the first field where two configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return path or "config"
