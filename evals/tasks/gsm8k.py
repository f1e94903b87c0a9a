"""``gsm8k`` and custom JSONL tasks: questions and answers read from files.

GSM8K's format is one JSON object a line with ``question`` and ``answer``, the answer a
worked solution ending in ``#### N``. A custom task is any JSONL with ``question`` and
``answer`` fields; its answer may be bare (``"42"``) or GSM8K-style.

Nothing is downloaded: point the task at a file (the project's tests use
``../shared/data/gsm8k/``).
"""

from __future__ import annotations

import json
from pathlib import Path

from assist.errors import BadRequest
from evals.tasks._base import Sample, Split, Task, check_split
from strategies.extract import EXTRACTORS, gsm8k_strict

__all__ = ["JsonlError", "JsonlTask", "gsm8k_task", "read_jsonl"]

class JsonlError(BadRequest):
    """A task file that cannot be read; the message names the file and line."""


def read_jsonl(path: Path, *, skip_bad: bool = False) -> tuple[list[dict], list[str]]:
    """Rows of a JSONL file, and a message for every skipped malformed line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JsonlError(f"cannot read task file {path}: {exc.strerror or exc}") from exc
    rows, problems = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise ValueError("needs an object with 'question' and 'answer'")
        except ValueError as exc:
            message = f"{path}:{lineno}: malformed line ({exc})"
            if not skip_bad:
                raise JsonlError(message) from exc
            problems.append(message)
            continue
        rows.append(row)
    return rows, problems


def _gold(answer: object) -> str:
    text = str(answer)
    return gsm8k_strict(text) or text.strip()


class JsonlTask(Task):
    """Questions from JSONL files, one file per split (missing splits are empty)."""

    def __init__(
        self,
        name: str,
        files: dict[Split, Path],
        extractor: str = "strict",
        skip_bad: bool = False,
    ) -> None:
        if extractor not in EXTRACTORS:
            raise ValueError(f"unknown extractor {extractor!r}; expected one of {', '.join(EXTRACTORS)}")
        self.name = name
        self.files = files
        self.extractor = EXTRACTORS[extractor]
        self.skip_bad = skip_bad
        self.problems: list[str] = []
        self._cache: dict[str, list[Sample]] = {}

    def split(self, split: Split, n: int | None = None) -> list[Sample]:
        split = check_split(split)
        if split not in self._cache:
            path = self.files.get(split)
            samples: list[Sample] = []
            if path is not None:
                rows, problems = read_jsonl(path, skip_bad=self.skip_bad)
                self.problems += problems
                for i, row in enumerate(rows):
                    samples.append(Sample(
                        id=str(row.get("id", f"{self.name}-{split}-{i}")),
                        question=str(row["question"]),
                        answer=_gold(row["answer"]),
                        solution=str(row["answer"]) if "####" in str(row["answer"]) else "",
                    ))
            self._cache[split] = samples
        return self._cache[split][:n]


def gsm8k_task(directory: Path, extractor: str = "strict") -> JsonlTask:
    """GSM8K from a folder holding ``train.jsonl`` and ``test.jsonl``."""
    if not (directory / "test.jsonl").is_file():
        raise JsonlError(f"no GSM8K test.jsonl in {directory}")
    files: dict[Split, Path] = {"test": directory / "test.jsonl"}
    if (directory / "train.jsonl").is_file():
        files["train"] = directory / "train.jsonl"
    return JsonlTask("gsm8k", files, extractor=extractor)
