"""Shared fixtures: one real `test`-preset run, trained once per session and reused."""

from __future__ import annotations

import os
import signal
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


def train_until_killed(line: str, *args: str) -> None:
    """Start ``assist train ARGS`` and SIGKILL it as soon as it prints ``line`` (no timing guesses)."""
    proc = subprocess.Popen([*ASSIST, "train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO)
    assert proc.stdout is not None
    seen = []
    for text in proc.stdout:
        seen.append(text)
        if line in text:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """(run folder, wall seconds) of `assist train --preset test`, the whole pipeline."""
    out = tmp_path_factory.mktemp("run") / "test"
    t0 = time.perf_counter()
    # A minute alone on 2 cores (test_pipeline checks that figure); the limit is only a
    # backstop against a hang, wide enough for a machine busy with other work.
    proc = run_assist("train", "--preset", "test", "--out", str(out), timeout=900)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, elapsed


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip("../shared/data/gsm8k is not beside this clone")
    return GSM8K
