"""Resuming training: stages run in new processes, one of them SIGKILLed mid-stage, match one
run straight through bit for bit; a checkpoint file cannot run code when it is loaded."""

from __future__ import annotations

import io
import json
import random
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tests.conftest import run_assist, train_until_killed
from training._loop import CheckpointError, Dist, StepOutput, load_checkpoint, seed_stage, train
from training.config import OptimConfig, apply_overrides, preset
from training.pipeline import RunError, run
from training.progress import Reporter

# The `test` preset cut to the least that still runs every stage the reward model and RL need.
SMALL = [
    "model.vocab_size=400", "model.hidden_size=32", "model.intermediate_size=64",
    "data.tokenizer_chars=40000", "data.copy_warmup_steps=0",
    "pretrain.steps=2", "pretrain.batch_size=2", "pretrain.seq_len=64",
    "sft.steps=2", "sft.batch_size=2", "sft.seq_len=256", "sft.eval_items=2",
    "rm.steps=2", "rm.batch_size=1", "rm.prompts=4", "rm.k=2", "rm.max_new_tokens=6",
    "rm.checkpoint_every=1",
    "rl.steps=2", "rl.batch_size=2", "rl.group_size=2", "rl.max_new_tokens=6", "rl.eval_items=2",
    "rl.checkpoint_every=1",
    "diversity.prompts=1", "diversity.k=2", "diversity.max_new_tokens=4",
]
EARLY = ["tokenizer", "pretrain", "sft"]
LATE = ["rm", "rl"]


def _quiet() -> Reporter:
    return Reporter(console=Console(file=io.StringIO()))


def _assert_same_weights(a, b) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    differ = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not differ, f"{a.name}: {len(differ)} tensors differ, first {differ[0]}"


def _train_until(out, line: str) -> None:
    """``assist train --resume`` of rm and rl in a new process, SIGKILLed once it prints ``line``."""
    train_until_killed(line, "--preset", "test", *[a for s in SMALL for a in ("--set", s)],
                       "--stages", ",".join(LATE), "--out", str(out), "--resume")


@pytest.mark.slow
def test_reward_model_and_rl_resumed_in_new_processes_match_an_uninterrupted_run(tmp_path):
    cfg = apply_overrides(preset("test"), SMALL)
    straight, split = tmp_path / "straight", tmp_path / "split"
    # One process, stage after stage: a fresh one, so the comparison is between processes
    # that start alike (pytest's own may carry another test's torch thread settings).
    proc = run_assist("train", "--preset", "test", *[a for s in SMALL for a in ("--set", s)],
                      "--stages", ",".join(EARLY + LATE), "--out", str(straight))
    assert proc.returncode == 0, proc.stderr[-3000:]

    run(cfg, split, EARLY, reporter=_quiet())  # stopped after SFT ...
    _train_until(split, "rl: checkpoint step 1")  # a new process: the whole rm stage, part of rl
    proc = run_assist("train", "--preset", "test", *[a for s in SMALL for a in ("--set", s)],
                      "--stages", ",".join(LATE), "--out", str(split), "--resume")  # and another
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rm: already done, kept" in proc.stdout
    assert json.loads((split / "metrics.json").read_text())["stages"]["rl"]["resumed_from_step"] == 1

    for folder in ("sft", "rm", "rlhf"):
        _assert_same_weights(straight / folder, split / folder)


def _toy_run(ckpt, *, resume: bool, fail_at: int | None = None) -> torch.nn.Module:
    """A stage in miniature: seeded, an initialisation and batches from the global RNGs."""
    seed_stage(0, "toy")
    model = torch.nn.Linear(4, 1)
    cfg = OptimConfig(steps=6, batch_size=1, lr=1e-2, warmup_steps=1, checkpoint_every=2)

    def step_fn(m: torch.nn.Module, step: int) -> StepOutput:
        if step == fail_at:
            raise KeyboardInterrupt  # killed after the checkpoint at step 2
        x = torch.randn(8, 4) + float(np.random.rand()) + random.random()
        return StepOutput(m(x).pow(2).mean(), 8)

    train(model, cfg, step_fn, checkpoint=ckpt, dist=Dist(), reporter=_quiet(), label="toy", resume=resume)
    return model


def test_a_stage_killed_mid_way_resumes_to_the_same_weights(tmp_path):
    reference = _toy_run(tmp_path / "ref.pt", resume=False)
    ckpt = tmp_path / "toy.pt"
    with pytest.raises(KeyboardInterrupt):
        _toy_run(ckpt, resume=True, fail_at=3)
    state = load_checkpoint(ckpt)  # tensors and plain values only
    assert state["step"] == 2
    torch.manual_seed(99)  # another process's history
    np.random.seed(99)
    random.seed(99)
    resumed = _toy_run(ckpt, resume=True)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _crafted_checkpoint(path, marker) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _RunsCode(marker), "optimizer": {}, "step": 1, "tokens": 0,
                "losses": [], "metrics": {}}, path)


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    ckpt, marker = tmp_path / "evil.pt", tmp_path / "marker"
    _crafted_checkpoint(ckpt, marker)
    with pytest.raises(CheckpointError, match="delete it"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError):
        train(torch.nn.Linear(2, 1), OptimConfig(steps=2), lambda m, s: StepOutput(m.weight.sum(), 1),
              checkpoint=ckpt, dist=Dist(), reporter=_quiet(), label="evil", resume=True)
    assert not marker.exists()


def test_a_crafted_checkpoint_in_a_run_folder_stops_resume_with_one_line(tmp_path):
    cfg = apply_overrides(preset("test"), SMALL)
    out, marker = tmp_path / "run", tmp_path / "marker"
    run(cfg, out, ["tokenizer"], reporter=_quiet())
    _crafted_checkpoint(out / "checkpoints" / "pretrain.pt", marker)
    with pytest.raises(RunError, match="pretrain.pt holds objects other than tensors"):
        run(cfg, out, ["pretrain"], resume=True, reporter=_quiet())
    assert not marker.exists()
    shutil.rmtree(out)


def _train_small(out, *args: str):
    # Two threads, so the run may give one to a second process whatever this machine has.
    return run_assist("train", "--preset", "test", *[a for s in SMALL for a in ("--set", s)],
                      "--out", str(out), *args, env={"OMP_NUM_THREADS": "2"})


def test_scratch_trains_in_a_second_process_beside_rm_and_rl(tmp_path):
    beside, sequential = tmp_path / "beside", tmp_path / "sequential"
    proc = _train_small(beside)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scratch: training in a second process beside the stages after it (1 of 2 threads" in proc.stdout
    ledger = json.loads((beside / "metrics.json").read_text())
    assert list(ledger["stages"]) == ["tokenizer", "pretrain", "sft", "scratch", "rm", "rl"]  # pipeline order
    assert ledger["stages"]["scratch"]["beside"] is True
    assert "scratch: done in" in (beside / "logs" / "scratch.log").read_text()
    assert ledger["wall_s"] > 0  # the run's own wall time: the stages' times overlap
    # --sequential: the same stages, one after another, in one process
    proc = _train_small(sequential, "--sequential")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = json.loads((sequential / "metrics.json").read_text())
    assert "beside" not in ledger["stages"]["scratch"] and not (sequential / "logs").exists()
    assert ledger["stages"]["scratch"]["steps"] == ledger["stages"]["sft"]["steps"]


def test_a_stage_failing_in_its_second_process_fails_the_run_with_one_line(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    proc = _train_small(out, "--stages", "tokenizer,pretrain,sft")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _crafted_checkpoint(out / "checkpoints" / "scratch.pt", marker)
    proc = _train_small(out, "--stages", "scratch,rm,rl", "--resume")
    assert proc.returncode != 0
    assert "stage 'scratch' failed in its own process" in proc.stderr
    assert "scratch.pt holds objects other than tensors" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    ledger = json.loads((out / "metrics.json").read_text())
    assert "scratch" not in ledger["stages"] and "rm" in ledger["stages"]  # what finished is kept
