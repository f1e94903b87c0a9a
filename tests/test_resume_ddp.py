"""A killed run resumes without losing finished work; DDP trains with two CPU processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_assist, train_until_killed

pytestmark = pytest.mark.slow


def _train_until(out: Path, line: str, *extra: str) -> None:
    train_until_killed(line, "--preset", "test", "--out", str(out), "--resume", *extra)


def _ledger(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_killed_run_resumes_with_same_steps_and_keeps_finished_stages(tmp_path, trained_run):
    out = tmp_path / "run"
    _train_until(out, "pretrain: checkpoint step 20")
    assert "pretrain" not in _ledger(out)["stages"] and (out / "checkpoints" / "pretrain.pt").exists()
    tokenizer_mtime = (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns

    # Resume, then kill again in the middle of SFT: pretraining is finished by then.
    _train_until(out, "sft: checkpoint step 20")
    ledger = _ledger(out)
    pre = ledger["stages"]["pretrain"]
    assert pre["resumed_from_step"] >= 20 and pre["steps"] == 80
    assert pre["tokens"] == 80 * 8 * 128  # every step counted exactly once
    assert (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tokenizer_mtime
    base_mtime = (out / "base" / "model.safetensors").stat().st_mtime_ns

    proc = run_assist("train", "--preset", "test", "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pretrain: already done, kept" in proc.stdout
    assert "sft: resumed from checkpoint at step" in proc.stdout
    ledger = _ledger(out)
    assert list(ledger["stages"]) == ["tokenizer", "pretrain", "sft", "scratch", "rm", "rl"]
    assert ledger["stages"]["sft"]["steps"] == 80 and ledger["stages"]["sft"]["resumed_from_step"] >= 20
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == base_mtime

    # Batches are a function of the step and the optimiser state is restored, so the
    # interrupted pretraining ends with the same weights as the uninterrupted one.
    reference, _ = trained_run
    a = load_file(out / "base" / "model.safetensors")
    b = load_file(reference / "base" / "model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_torchrun_ddp_two_cpu_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "assist.cli", "train", "--preset", "test",
         "--stages", "tokenizer,pretrain,sft", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = _ledger(out)
    assert ledger["stages"]["pretrain"]["tokens"] == 2 * 80 * 8 * 128  # two ranks, own batches
    assert ledger["stages"]["pretrain"]["loss_last"] < ledger["stages"]["pretrain"]["loss_first"]
    from transformers import AutoModelForCausalLM

    for name in ("base", "sft"):
        assert AutoModelForCausalLM.from_pretrained(out / name).num_parameters() > 0
    assert not (out / "rm").exists()
