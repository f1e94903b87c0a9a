"""The one optimisation loop every stage shares.

AdamW with warm-up, an optional stable phase (``decay_start``) and cosine decay, gradient
clipping, bf16 autocast on a GPU (on a CPU when asked), torch.compile when asked, DDP when
launched by ``torchrun`` (gloo on CPU, NCCL on GPU), and periodic checkpoints: the state
(weights, optimiser, step, loss history) is written atomically every ``checkpoint_every``
steps, and a resumed run continues from it. Batches are a pure function of (seed, step,
rank), so a resumed run sees exactly the batches the killed one would have.

Reproducibility across processes: ``seed_stage`` seeds torch, numpy and ``random`` from (run
seed, stage name) at the start of every stage, so a stage's initialisation (the reward head,
say) never depends on which stages ran before it in the process; a checkpoint also holds the
global RNG states at its step, and resuming restores them. Checkpoints hold only tensors and
plain values and are read with ``torch.load(weights_only=True)``: a crafted file cannot run
code when it is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch._dynamo import config as dynamo_config

from assist.errors import BadRequest
from training.config import OptimConfig
from training.progress import Reporter

__all__ = [
    "CheckpointError",
    "Dist",
    "LoopResult",
    "StepOutput",
    "autocast_for",
    "load_checkpoint",
    "lr_at",
    "native_bf16",
    "rng_state",
    "seed_stage",
    "set_rng_state",
    "setup_distributed",
    "stage_seed",
    "train",
]


class CheckpointError(BadRequest, RuntimeError):
    """A checkpoint that cannot be loaded safely; the message says what to do."""


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage: a function of (run seed, stage name) alone, below 2**32."""
    digest = hashlib.sha256(f"assist-stage:{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_stage(seed: int, stage: str) -> None:
    """Seed torch (every device), numpy and ``random`` for ``stage``, whatever ran before."""
    s = stage_seed(seed, stage)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this process's own device
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A training checkpoint, read without unpickling anything but tensors and plain values."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values, so it is not "
            "loaded (loading it could run code); delete it to restart that stage") from exc
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint; delete it to restart that stage")
    return state


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch_dist.all_reduce(t)
        return float(t.item()) / self.world_size


def setup_distributed() -> Dist:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world == 1:
        return Dist(device=device)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend)
    return Dist(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), device=device)


@dataclass
class StepOutput:
    loss: torch.Tensor  # what is back-propagated
    tokens: int  # tokens processed this step on this process
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopResult:
    steps: int
    tokens: int
    wall_s: float
    losses: list[float]
    metrics: dict[str, list[float]]
    resumed_from: int


def lr_at(step: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = cfg.warmup_steps + int(cfg.decay_start * max(0, cfg.steps - cfg.warmup_steps))
    if step < start:  # warm-up, stable, decay: the peak rate holds until decay_start
        return cfg.lr
    span = max(1, cfg.steps - start)
    progress = min(1.0, (step - start) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (a CPU without it emulates, slowly)."""
    return device.type == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_for(device: torch.device, mode: str) -> Any:
    """bfloat16 autocast where ``mode`` asks for it ("auto": on a GPU only; "native": where
    the device computes it natively)."""
    cast = {"off": False, "bf16": True, "auto": device.type == "cuda", "native": native_bf16(device)}[mode]
    return torch.autocast(device.type, dtype=torch.bfloat16) if cast else nullcontext()


@functools.cache
def _compile_failure(device: str) -> str | None:
    """Why torch.compile cannot work on ``device`` here (no C++ compiler, say), or None. A
    probe compiles a forward and a backward, since a backward fails only when it is first
    run, past torch's own fallback. Once per process and device: every stage asks."""
    try:
        x = torch.ones(4, device=device, requires_grad=True)
        torch.compile(lambda t: (t * 2).sin().sum())(x).backward()
    except Exception as exc:  # noqa: BLE001 - any failure means: train eagerly
        return type(exc).__name__
    return None


def _compiled(model: torch.nn.Module, device: torch.device, reporter: Reporter, label: str) -> torch.nn.Module:
    """``torch.compile(model)``, or ``model`` itself where compiling cannot work here. The
    caller keeps the original module for ``state_dict()``, whose keys a compiled wrapper
    would prefix."""
    failure = _compile_failure(str(device))
    if failure is not None:
        reporter.log(f"{label}: torch.compile is unavailable here ({failure}); training eagerly")
        return model
    return torch.compile(model)  # type: ignore[return-value]


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def train(
    model: torch.nn.Module,
    cfg: OptimConfig,
    step_fn: Callable[[torch.nn.Module, int], StepOutput],
    *,
    checkpoint: Path,
    dist: Dist,
    reporter: Reporter,
    label: str,
    resume: bool = True,
) -> LoopResult:
    """Run ``cfg.steps`` optimiser steps of ``step_fn(model, step)``; resumable."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    start, tokens, losses, metrics = 0, 0, [], {}
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, dist.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, tokens, losses, metrics = state["step"], state["tokens"], state["losses"], state["metrics"]
        if "rng" in state:  # checkpoints written before RNG states were kept lack it
            set_rng_state(state["rng"])
        reporter.log(f"{label}: resumed from checkpoint at step {start}")
    wrapped: torch.nn.Module = model
    if dist.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        wrapped = _compiled(wrapped, dist.device, reporter, label)
    autocast = autocast_for(dist.device, cfg.autocast)
    # Compiling is lazy (at the first steps): for this loop only, a graph that fails to
    # compile runs eagerly instead of ending the stage; the process's setting is restored.
    lenient = dynamo_config.patch(suppress_errors=True) if cfg.compile else nullcontext()
    t0 = time.perf_counter()
    model.train()
    with lenient, reporter.task(label, total=cfg.steps, completed=start) as advance:
        for step in range(start, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            with autocast:
                out = step_fn(wrapped, step)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = dist.mean(float(out.loss.detach()))
            losses.append(loss)
            tokens += int(dist.mean(out.tokens) * dist.world_size)
            for k, v in out.metrics.items():
                metrics.setdefault(k, []).append(dist.mean(float(v)))
            advance(loss=loss)
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                if dist.is_main:
                    _save(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "step": done, "tokens": tokens, "losses": losses,
                                       "metrics": metrics, "rng": rng_state()})
                    reporter.log(f"{label}: checkpoint step {done}")
                dist.barrier()
    model.eval()
    return LoopResult(cfg.steps, tokens, time.perf_counter() - t0, losses, metrics, start)
