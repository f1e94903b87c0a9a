"""The one optimisation loop every stage shares.

AdamW with warm-up and cosine decay, gradient clipping, bf16 autocast on a GPU, DDP when
launched by ``torchrun`` (gloo on CPU, NCCL on GPU), and periodic checkpoints: the state
(weights, optimiser, step, loss history) is written atomically every ``checkpoint_every``
steps, and a resumed run continues from it. Batches are a pure function of (seed, step,
rank), so a resumed run sees exactly the batches the killed one would have.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from training.config import OptimConfig
from training.progress import Reporter

__all__ = ["Dist", "LoopResult", "StepOutput", "lr_at", "setup_distributed", "train"]


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
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
        state = torch.load(checkpoint, map_location=dist.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, tokens, losses, metrics = state["step"], state["tokens"], state["losses"], state["metrics"]
        reporter.log(f"{label}: resumed from checkpoint at step {start}")
    wrapped: torch.nn.Module = model
    if dist.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.type == "cuda"
                else nullcontext())
    t0 = time.perf_counter()
    model.train()
    with reporter.task(label, total=cfg.steps, completed=start) as advance:
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
                                       "metrics": metrics})
                    reporter.log(f"{label}: checkpoint step {done}")
                dist.barrier()
    model.eval()
    return LoopResult(cfg.steps, tokens, time.perf_counter() - t0, losses, metrics, start)
