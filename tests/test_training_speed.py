"""The loop's speed settings: bfloat16 autocast on the CPU when asked, torch.compile when
asked; both leave the stage's module, its float32 weights and its checkpoints as they were."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from training._loop import Dist, StepOutput, load_checkpoint, native_bf16, train
from training.config import ConfigError, OptimConfig, apply_overrides, preset
from training.progress import Reporter


def _run(tmp_path, log: io.StringIO | None = None,
         **settings) -> tuple[torch.nn.Module, list[torch.nn.Module], list[torch.dtype]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    cfg = OptimConfig(steps=4, batch_size=1, lr=1e-2, warmup_steps=1, checkpoint_every=2, **settings)
    seen: list[torch.nn.Module] = []
    dtypes: list[torch.dtype] = []
    data = torch.Generator().manual_seed(1)

    def step_fn(m: torch.nn.Module, step: int) -> StepOutput:
        seen.append(m)
        out = m(torch.randn(16, 8, generator=data))
        dtypes.append(out.dtype)
        return StepOutput(out.float().pow(2).mean(), 16)

    train(model, cfg, step_fn, checkpoint=tmp_path / "toy.pt", dist=Dist(),
          reporter=Reporter(console=Console(file=log or io.StringIO())), label="toy", resume=False)
    return model, seen, dtypes


def test_cpu_autocast_is_off_unless_asked_and_bf16_when_asked(tmp_path):
    _, _, auto = _run(tmp_path / "auto", autocast="auto")
    assert set(auto) == {torch.float32}  # "auto" casts on a GPU only
    model, _, asked = _run(tmp_path / "bf16", autocast="bf16")
    assert set(asked) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32
    _, _, off = _run(tmp_path / "off", autocast="off")
    assert set(off) == {torch.float32}
    _, _, native = _run(tmp_path / "native", autocast="native")  # bf16 only where the CPU has it
    assert set(native) == {torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32}


@pytest.mark.slow
def test_a_compiled_stage_trains_the_module_it_was_given_and_checkpoints_its_keys(tmp_path):
    import torch._dynamo

    eager, seen_eager, _ = _run(tmp_path / "eager")
    before = torch._dynamo.config.suppress_errors
    compiled, seen, _ = _run(tmp_path / "compiled", compile=True)
    assert torch._dynamo.config.suppress_errors == before  # lenient in the stage, not after it
    assert seen_eager[0] is eager and seen[0] is not compiled  # the compiled steps ran a wrapper
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the same updates, applied to the original module
    state = load_checkpoint(tmp_path / "compiled" / "toy.pt")
    assert set(state["model"]) == {"weight", "bias"}  # no "_orig_mod." prefix: resumable eagerly


def test_speed_settings_are_checked_flags():
    run = apply_overrides(preset("test"), ["pretrain.autocast=bf16", "sft.compile=true"])
    assert run.pretrain.autocast == "bf16" and run.sft.compile and not run.pretrain.compile
    with pytest.raises(ConfigError, match="pretrain.autocast"):
        apply_overrides(preset("test"), ["pretrain.autocast=fp16"])
    with pytest.raises(ValueError, match="autocast"):
        OptimConfig(autocast="fp16")  # type: ignore[arg-type]


_EAGER_WITHOUT_COMPILER = """
import io, pathlib, sys
from tests.test_training_speed import _run
log = io.StringIO()
model, seen, _ = _run(pathlib.Path(sys.argv[1]), log, compile=True)
assert seen[0] is model, "the steps ran a compiled wrapper"
print(log.getvalue())
"""


@pytest.mark.slow
def test_without_a_cxx_compiler_a_compiled_stage_trains_eagerly_and_says_so(tmp_path):
    # A new process: this one may hold compiled kernels already. A backward that cannot be
    # compiled fails when first run, past torch's own fallback, so the loop probes first.
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, "-c", _EAGER_WITHOUT_COMPILER, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.compile is unavailable here" in done.stdout and "training eagerly" in done.stdout
