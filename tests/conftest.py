"""Shared fixtures: one real `test`-preset run, trained once per session and reused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"  # present beside a developer's and CI's clone
ASSIST = [sys.executable, "-m", "assist.cli"]


def run_assist(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ASSIST, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """(run folder, wall seconds) of `assist train --preset test`, the whole pipeline."""
    out = tmp_path_factory.mktemp("run") / "test"
    t0 = time.perf_counter()
    proc = run_assist("train", "--preset", "test", "--out", str(out))
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, elapsed


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip("../shared/data/gsm8k is not beside this clone")
    return GSM8K
